"""Fold orchestration: the folds of an experiment on local GPUs / CPU, or as one SLURM array (steel.slurm).

Each fold is one ``steel fit`` writing ``RUN_DIR/fold-K/``. A fold is done when ``steel.rundir.fold_done`` says
so (the one definition, for both executors); a done fold is skipped, an unfinished one resumes from its
``last.ckpt``. Locally, a failed fold is retried ``--retries`` times only if the failed attempt wrote a new
last.ckpt (an attempt that wrote none would fail the same way again), and the cause is printed in one line.
Before anything runs, a fold whose checkpoints were trained on another split is refused
(``steel.rundir.check_fold``), as are launch options written after ``--``. When every fold of the split is done
the OOF store is built (``steel oof``); ``RUN_DIR/summary.json`` holds each fold's true state.
A stage (``--init-from EARLIER_RUN``, or ``init_from`` in the recipe) starts fold K from fold K of the earlier
run; an earlier run on another split, or an unfinished earlier fold, is refused first (``steel.stages``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from steel.errors import SteelError
from steel.io import read_json, write_json, write_text
from steel.rundir import FOLDS_FILE, METRICS_FILE, check_fold, fold_done

# option strings of `steel launch` (refused after `--`), filled by add_arguments
LAUNCH_FLAGS: set[str] = set()


def parse_folds(spec: str | None, n_folds: int) -> list[int]:
    """'0-9', '0,2,5', '1-3,7' or None (all) -> sorted fold numbers; SteelError for a malformed, reversed or
    empty range, or a fold outside 0..n_folds-1."""
    if spec is None:
        return list(range(n_folds))
    out: set[int] = set()
    for part in spec.split(","):
        a, sep, b = part.strip().partition("-")
        try:
            lo = int(a)
            hi = int(b) if sep else lo
        except ValueError:
            raise SteelError(f"--folds {spec!r}: expected e.g. 0-9 or 0,2,5") from None
        if hi < lo:
            raise SteelError(f"--folds {spec!r}: range {lo}-{hi} is reversed (write {hi}-{lo})")
        out.update(range(lo, hi + 1))
    bad = sorted(k for k in out if not 0 <= k < n_folds)
    if bad:
        raise SteelError(f"--folds {spec!r}: fold {bad[0]} outside 0..{n_folds - 1} of the split")
    return sorted(out)


def parse_gpus(spec: str | None) -> list[str]:
    """'0,1,2,3' -> ['0', '1', '2', '3']; None/'' -> []."""
    return [g.strip() for g in spec.split(",") if g.strip()] if spec else []


def check_overrides(overrides: list[str]) -> None:
    """SteelError if a launch option was written after ``--`` (it would go to every ``steel fit``)."""
    for a in overrides:
        name = a.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            raise SteelError(
                f"{name} is a `steel launch` option but comes after `--`, which passes it to every `steel fit`; "
                f"put it before `--`"
            )


def visible_gpus() -> int:
    """CUDA devices torch can use on this machine (ignoring this process's CUDA_VISIBLE_DEVICES)."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    code = "import torch; print(torch.cuda.device_count())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    try:
        return int(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def check_gpus(gpus: list[str]) -> None:
    """SteelError (one line) when a --gpus id is not a CUDA device of this machine: such a fold could only fail."""
    n = visible_gpus()
    if n == 0:
        raise SteelError(
            f"--gpus {','.join(gpus)}: this machine has no CUDA GPU that torch can use "
            f"(torch.cuda.device_count() is 0); leave out --gpus to train on CPU"
        )
    bad = [g for g in gpus if not g.isdigit() or int(g) >= n]
    if bad:
        raise SteelError(f"--gpus {','.join(gpus)}: GPU {bad[0]} does not exist (torch sees {n}: 0..{n - 1})")


def _experiment(config: str) -> dict[str, Any]:
    path = Path(config)
    if not path.is_file():
        raise SteelError(f"{path}: experiment config not found")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SteelError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def _override(overrides: list[str], key: str) -> str | None:
    """Value of ``--key V`` or ``--key=V`` among LightningCLI overrides."""
    for i, a in enumerate(overrides):
        if a == f"--{key}" and i + 1 < len(overrides):
            return overrides[i + 1]
        if a.startswith(f"--{key}="):
            return a.split("=", 1)[1]
    return None


def _drop(overrides: list[str], key: str) -> list[str]:
    out, skip = [], False
    for a in overrides:
        if skip:
            skip = False
            continue
        if a == f"--{key}":
            skip = True
            continue
        if a.startswith(f"--{key}="):
            continue
        out.append(a)
    return out


@dataclass
class Fold:
    """State of one fold while the launcher runs it."""

    k: int
    dir: Path
    state: str = "queued"  # queued | running | done | failed; SLURM also pending | cancelled | timeout | ...
    attempts: int = 0
    proc: subprocess.Popen | None = None
    slot: int | None = None
    started: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    cause: str = ""
    job_id: str | None = None
    last_mtime: float | None = None
    log_offset: int = 0

    def progress(self) -> dict[str, Any]:
        for name in (METRICS_FILE, "progress.json"):
            p = self.dir / name
            if p.is_file():
                try:
                    return json.loads(p.read_text())
                except (OSError, ValueError):
                    pass
        return {}


def fit_args(
    config: str,
    k: int,
    run_dir: Path,
    overrides: list[str],
    devices: int,
    accelerator: str,
    num_nodes: int = 1,
) -> list[str]:
    """Arguments of ``steel fit`` (after ``fit``) for fold k, without the resume checkpoint."""
    args = ["--config", str(config), *overrides, "--data.folds_csv", str(run_dir / FOLDS_FILE),
            "--data.fold", str(k), "--run_dir", str(run_dir / f"fold-{k}"),
            "--trainer.accelerator", accelerator, "--trainer.devices", str(devices)]  # fmt: skip
    if num_nodes > 1:
        args += ["--trainer.num_nodes", str(num_nodes)]
    if devices * num_nodes > 1:
        args += ["--trainer.strategy", "ddp"]
    return args


def fold_command(
    config: str, k: int, run_dir: Path, overrides: list[str], devices: int, accelerator: str
) -> list[str]:
    """The ``steel fit`` command line of fold k (resuming from last.ckpt when there is one)."""
    cmd = [
        sys.executable,
        "-m",
        "steel.cli",
        "fit",
        *fit_args(config, k, run_dir, overrides, devices, accelerator),
    ]
    last = run_dir / f"fold-{k}" / "last.ckpt"
    if last.is_file():
        cmd += ["--ckpt_path", str(last)]
    return cmd


def fold_env(experiment: str) -> dict[str, str]:
    """Environment of a fold process: its W&B run is in the experiment's group with job type train."""
    return {"WANDB_JOB_TYPE": "train", "WANDB_RUN_GROUP": experiment,
            "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}  # fmt: skip


def error_line(log: str) -> str:
    """The line of a fold's log that says why it failed: a steel/LightningCLI error line or the last line of a
    traceback (exception name without its module path), else the last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = re.match(r"^steel \w+: error: (.*)", ln) or re.match(r"^(?:[\w.]+: )?error: (.*)", ln)
        if m:
            return m.group(1)
        m = re.match(
            r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)\w*)(?:: (.*))?$", ln
        )
        if m:
            return f"{m.group(1)}: {m.group(2)}" if m.group(2) else m.group(1)
    return lines[-1][:300] if lines else "no output"


def _fmt(v: Any) -> str:
    """A dice value for the progress table: 4 decimals, or '-' before the first validation."""
    return f"{v:.4f}" if isinstance(v, int | float) else "-"


def table(folds: list[Fold]) -> str:
    """The progress table: fold, state, epoch, val/dice, best (and the SLURM job and cause where known)."""
    rows = [f"{'fold':>4}  {'state':<10} {'epoch':>5}  {'val/dice':>8}  {'best':>6}  job / cause"]
    for f in folds:
        p = f.info or f.progress()
        ep = p.get("epoch", p.get("best_epoch", ""))
        extra = "  ".join(x for x in (f.job_id or "", f.cause) if x)
        rows.append(
            f"{f.k:>4}  {f.state:<10} {ep!s:>5}  {_fmt(p.get('val_dice')):>8}  {_fmt(p.get('best_val_dice')):>6}  {extra}"
        )
    return "\n".join(rows)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the fold process gets SIGTERM if the launcher dies, even by SIGKILL."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


class LocalLauncher:
    """Runs fold processes in slots: GPU groups (CUDA_VISIBLE_DEVICES) or CPU processes."""

    def __init__(self, folds: list[Fold], config: str, run_dir: Path, overrides: list[str], gpus: list[str],
                 gpus_per_fold: int, parallel: int, retries: int, poll: float = 1.0,
                 experiment: str | None = None) -> None:  # fmt: skip
        self.folds, self.config, self.run_dir, self.overrides = folds, config, run_dir, overrides
        self.retries, self.poll = retries, poll
        self.experiment = experiment or Path(config).stem
        if gpus:
            if gpus_per_fold < 1 or len(gpus) < gpus_per_fold:
                raise SteelError(f"--gpus-per-fold {gpus_per_fold} does not fit in --gpus {','.join(gpus)}")
            self.slots = [
                gpus[i : i + gpus_per_fold] for i in range(0, len(gpus) - gpus_per_fold + 1, gpus_per_fold)
            ]
            self.devices, self.accelerator = gpus_per_fold, "gpu"
        else:
            self.slots = [[] for _ in range(max(1, parallel))]
            self.devices, self.accelerator = 1, "cpu"
        self.free = list(range(len(self.slots)))
        self._last_table = 0.0

    def _start(self, f: Fold) -> None:
        slot = self.free.pop(0)
        cmd = fold_command(self.config, f.k, self.run_dir, self.overrides, self.devices, self.accelerator)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(self.slots[slot]), PYTHONUNBUFFERED="1")
        env.update(fold_env(self.experiment))
        env.pop("WANDB_SERVICE", None)  # the fold's W&B run in its own wandb service, not in this launcher's
        if not self.slots[slot] and len(self.slots) > 1:  # CPU folds side by side share the cores
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(self.slots))))
        f.dir.mkdir(parents=True, exist_ok=True)
        f.last_mtime = _mtime(f.dir / "last.ckpt")
        log = open(f.dir / "train.log", "a")  # noqa: SIM115 - closed when the process ends
        f.log_offset = log.tell()
        log.write(f"\n# attempt {f.attempts + 1}: {shlex.join(cmd)}\n")
        log.flush()
        f.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
        )
        f.proc.log = log  # type: ignore[attr-defined]
        f.slot, f.state, f.started = slot, "running", time.time()
        f.attempts += 1
        where = f"GPU {','.join(self.slots[slot])}" if self.slots[slot] else "CPU"
        resume = " (resuming from last.ckpt)" if "--ckpt_path" in cmd else ""
        print(f"fold {f.k}: started on {where}{resume}, log {f.dir / 'train.log'}", flush=True)

    def _finish(self, f: Fold, rc: int) -> None:
        f.proc.log.close()  # type: ignore[union-attr]
        self.free.append(f.slot)
        self.free.sort()
        f.proc, f.slot = None, None
        if rc == 0 and fold_done(f.dir):
            f.info, f.state, f.cause = read_json(f.dir / METRICS_FILE), "done", ""
            print(f"fold {f.k}: done, best val/dice {_fmt(f.info.get('best_val_dice'))}", flush=True)
            from steel import tracking

            tracking.log_fold(f.dir)
            return
        with open(f.dir / "train.log", errors="replace") as fh:
            fh.seek(f.log_offset)
            f.cause = error_line(fh.read()) if rc != 0 else "exited 0 without a finished fold"
        progressed = _mtime(f.dir / "last.ckpt") not in (None, f.last_mtime)
        log = f.dir / "train.log"
        if f.attempts <= self.retries and progressed and rc != 2:
            f.state = "queued"
            print(f"fold {f.k}: exited {rc} ({f.cause}); retry {f.attempts}/{self.retries} from its last.ckpt "
                  f"(log {log})", flush=True)  # fmt: skip
            return
        f.state = "failed"
        why = ""
        if f.attempts <= self.retries:
            why = " (usage error)" if rc == 2 else " (no new last.ckpt: a retry would fail the same way)"
        print(
            f"fold {f.k}: FAILED (exit {rc}) after {f.attempts} attempt(s){why}: {f.cause}; log {log}",
            flush=True,
        )

    def table(self) -> str:
        return table(self.folds)

    def stop(self) -> None:
        for f in self.folds:
            if f.proc is not None and f.proc.poll() is None:
                os.killpg(f.proc.pid, signal.SIGTERM)
        for f in self.folds:
            if f.proc is not None:
                try:
                    f.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(f.proc.pid, signal.SIGKILL)

    def run(self, table_every: float = 30.0) -> None:
        try:
            while True:
                for f in self.folds:
                    if f.proc is not None and (rc := f.proc.poll()) is not None:
                        self._finish(f, rc)
                for f in self.folds:
                    if f.state == "queued" and self.free:
                        self._start(f)
                if not any(f.state in ("queued", "running") for f in self.folds):
                    return
                if time.time() - self._last_table > table_every:
                    print(self.table(), flush=True)
                    self._last_table = time.time()
                time.sleep(self.poll)
        except BaseException:
            self.stop()
            raise


def _sigterm(signum, frame):  # turn SIGTERM into an exception so children are stopped on the way out
    raise KeyboardInterrupt


def prepare_run_dir(run_dir: Path, config: str, folds_csv: str | None, overrides: list[str]) -> pd.DataFrame:
    """Create RUN_DIR with folds.csv and config.yaml; a resumed run must use the same split."""
    from steel.folds import load_folds

    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / FOLDS_FILE
    if folds_csv is None:
        if not target.is_file():
            raise SteelError(
                "no folds CSV: pass --folds-csv, set data.folds_csv in the config, or run `steel folds` first"
            )
        return load_folds(target)
    src = load_folds(folds_csv)
    if target.is_file():
        if not load_folds(target).equals(src):
            raise SteelError(
                f"{target} differs from {folds_csv}: this run dir was made with another split; use a new --run-dir"
            )
    else:
        shutil.copyfile(folds_csv, run_dir / ".folds.csv.tmp")
        os.replace(run_dir / ".folds.csv.tmp", target)
    cfg = _experiment(config)
    cfg.setdefault("launch", {})["overrides"] = overrides
    cfg["launch"]["experiment"] = str(config)
    write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    return src


def refuse_other_split(folds: list[Fold], run_dir: Path) -> None:
    """SteelError (one line) if a fold's checkpoint was trained as another fold or on another split."""
    from steel.folds import split_hash

    h = None
    for f in folds:
        for name in ("best.ckpt", "last.ckpt"):
            if (f.dir / name).is_file():
                h = h or split_hash(run_dir / FOLDS_FILE)
                check_fold(f.dir / name, f.k, h, run_dir)


def summarise(
    run_dir: Path, folds: list[Fold], experiment: str, executor: str, log_wandb: bool = True
) -> dict[str, Any]:
    """Each fold's state (and cause), CV mean/std of best val/dice over done folds -> summary.json; with
    ``log_wandb`` and every fold done, a W&B run of job type summary in the experiment's group."""
    done = [f for f in folds if f.state == "done"]
    scores = np.array(
        [v if isinstance(v := f.info.get("best_val_dice"), int | float) else np.nan for f in done], float
    )
    summary = {
        "experiment": experiment,
        "executor": executor,
        "folds": {
            str(f.k): {
                "state": f.state,
                "best_val_dice": f.info.get("best_val_dice"),
                "attempts": f.attempts,
                "job_id": f.job_id,
                "cause": f.cause,
            }  # fmt: skip
            for f in folds
        },
        "cv_mean": float(np.nanmean(scores)) if len(scores) else None,
        "cv_std": float(np.nanstd(scores)) if len(scores) else None,
        "failed": [f.k for f in folds if f.state in ("failed", "cancelled", "timeout", "terminated")],
        "updated": time.time(),
    }
    write_json(run_dir / "summary.json", summary)
    if log_wandb and len(done) == len(folds) and os.environ.get("WANDB_MODE", "offline") != "disabled":
        try:
            import wandb

            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "steel"), group=experiment, name="summary",
                             job_type="summary", dir=str(run_dir), reinit="finish_previous",
                             mode=os.environ.get("WANDB_MODE", "offline"), config={"folds": len(folds)},
                             settings=wandb.Settings(silent=True))  # fmt: skip
            tab = wandb.Table(columns=["fold", "state", "best_val_dice"],
                              data=[[f.k, f.state, f.info.get("best_val_dice")] for f in folds])  # fmt: skip
            run.log({"folds": tab})
            run.summary.update({"cv/mean_dice": summary["cv_mean"], "cv/std_dice": summary["cv_std"]})
            run.finish()
        except Exception as e:  # noqa: BLE001 - W&B trouble must not lose the run
            print(f"launch: W&B summary not logged ({e})", file=sys.stderr)
    return summary


def build_oof_if_complete(args: argparse.Namespace, run_dir: Path, n_folds: int) -> None:
    """Build the OOF store when every fold of the split is done (unless --no-oof)."""
    all_done = all(fold_done(run_dir / f"fold-{k}") for k in range(n_folds))
    if all_done and not args.no_oof:
        from steel import tracking
        from steel.oof import build_oof

        build_oof(run_dir, stride=args.oof_stride)
        tracking.log_oof(run_dir)
    elif not all_done:
        print(f"launch: OOF waits until all {n_folds} folds of the split are done")


# ---- SLURM ---------------------------------------------------------------------------------------------------
def _job_ids(folds: list[Fold], run_dir: Path) -> None:
    """Each fold's latest SLURM job: the launcher's jobs.json or the task's own record, whichever is newer."""
    from steel.slurm import read_record

    jobs_file = run_dir / "slurm" / "jobs.json"
    jobs = read_json(jobs_file) if jobs_file.is_file() else {}
    for f in folds:
        sub, rec = jobs.get(str(f.k)) or {}, read_record(f.dir)
        if rec.get("job_id") and rec.get("updated", 0) >= sub.get("submitted", 0):
            f.job_id = str(rec["job_id"])
        else:
            f.job_id = sub.get("job_id")


def run_slurm(args: argparse.Namespace, folds: list[Fold], run_dir: Path, overrides: list[str],
              n_folds: int, experiment: str) -> int:  # fmt: skip
    """Show where each fold is, refuse what cannot run, then submit the unfinished folds as one array."""
    from steel import slurm

    have_slurm = shutil.which("sinfo") is not None and shutil.which("squeue") is not None
    _job_ids(folds, run_dir)
    sched = slurm.job_states([f.job_id for f in folds if f.job_id]) if have_slurm else {}
    for f in folds:
        rec = slurm.read_record(f.dir)
        if f.job_id and str(rec.get("job_id")) == str(f.job_id):
            f.attempts = int(rec.get("restarts") or 0) + 1
        if f.state != "done":
            f.state, f.cause = slurm.fold_state(f.dir, f.job_id, sched)
            if f.state == "done":
                f.info = read_json(f.dir / METRICS_FILE)
    print(table(folds))
    summarise(run_dir, folds, experiment, "slurm", log_wandb=False)
    todo = [f for f in folds if f.state != "done"]
    if args.status:
        return 0
    if not todo:
        summarise(run_dir, folds, experiment, "slurm")
        build_oof_if_complete(args, run_dir, n_folds)
        return 0
    active = [f for f in todo if f.state in ("pending", "running")]
    if active and not args.dry_run:
        f = active[0]
        raise SteelError(
            f"fold {f.k} is already {f.state} as SLURM job {f.job_id} ({f.dir}); wait for it, or `scancel {f.job_id}` "
            f"and launch again"
        )
    if not args.dry_run and shutil.which("sbatch") is None:
        raise SteelError(
            "sbatch not found: --executor slurm submits from a SLURM login node (or use --dry-run)"
        )
    parts = slurm.partitions() if have_slurm else None
    part = None
    if parts is not None:
        part = (
            parts.get(args.partition)
            if args.partition
            else next((p for p in parts.values() if p.default), None)
        )
    gpus_per_fold = (
        args.gpus_per_fold if args.gpus_per_fold is not None else (1 if part is None or part.gpus else 0)
    )
    tasks_per_node = max(1, gpus_per_fold)
    cpus = args.cpus_per_task
    if cpus is None:
        cpus = 8 if part is None else max(1, min(8, part.cpus // tasks_per_node))
    req = slurm.Request(partition=args.partition, time_min=args.time, nodes=args.nodes, tasks_per_node=tasks_per_node,
                        gpus_per_node=gpus_per_fold, cpus_per_task=cpus, mem=args.mem,
                        array_parallelism=args.array_parallelism, signal_delay_s=args.signal_delay,
                        max_requeues=args.max_requeues, job_name=f"steel-{run_dir.name}")  # fmt: skip
    if parts is not None:
        part = slurm.check_request(req, parts)
    else:
        print("launch: no sinfo/squeue here: the request is not checked against a cluster", file=sys.stderr)
    accelerator = "gpu" if gpus_per_fold else "cpu"
    cwd = os.getcwd()
    tasks = [
        slurm.FoldTask(
            f.k,
            [
                *fit_args(args.config, f.k, run_dir, overrides, tasks_per_node, accelerator, args.nodes),
                *slurm.FIT_ARGS,
            ],
            str(f.dir),
            cwd,
            fold_env(experiment),
        )
        for f in todo
    ]
    folder = run_dir / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "commands.txt",
               "".join(f"fold {t.fold}: steel fit {shlex.join(t.fit_args)}\n" for t in tasks))  # fmt: skip
    where = f"partition {part.name}" if part else "the default partition"
    ids, _ = slurm.submit(tasks, folder, req, dry_run=args.dry_run)
    if args.dry_run:
        print(f"launch: dry run; array of {len(tasks)} fold(s) on {where} ({gpus_per_fold} GPU(s), {cpus} CPU(s) "
              f"per task) written to {folder / 'array.sbatch'} and {folder / 'commands.txt'}; `sbatch "
              f"{folder / 'array.sbatch'}` submits it as is")  # fmt: skip
        return 0
    jobs_file = folder / "jobs.json"
    jobs = read_json(jobs_file) if jobs_file.is_file() else {}
    for f, jid in zip(todo, ids):
        jobs[str(f.k)] = {"job_id": jid, "submitted": time.time()}
        print(
            f"fold {f.k}: submitted as SLURM job {jid}"
            + (" (resumes from last.ckpt)" if (f.dir / "last.ckpt").is_file() else "")
        )
    write_json(jobs_file, jobs)
    print(f"launch: {len(ids)} task(s) on {where}, {gpus_per_fold} GPU(s) and {cpus} CPU(s) per task, logs in {folder}; "
          "`--status` shows where they are; run the same command again when they have finished to build the OOF store")  # fmt: skip
    return 0


# ---- command line --------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    def add(parser: Any, *flags: str, **kw: Any) -> None:
        LAUNCH_FLAGS.update(parser.add_argument(*flags, **kw).option_strings)

    add(p, "--config", required=True, help="experiment YAML (experiments/NAME.yaml)")
    add(p, "--folds", default=None, help="folds to run, e.g. 0-9 or 0,3,5 (default: all of the split)")
    add(p, "--folds-csv", default=None, help="fold assignment CSV (default: data.folds_csv of the config)")
    add(p, "--data-dir", default=None, help="data directory (default: data.data_dir of the config)")
    add(p, "--run-dir", default=None, help="run directory (default runs/<config name>)")
    add(p, "--gpus", default=None, help="local GPU ids to use, e.g. 0,1,2,3 (default: CPU)")
    add(p, "--gpus-per-fold", type=int, default=None,
        help="GPUs per fold; > 1 trains a fold with DDP (default 1; SLURM: 1 on a GPU partition, else 0)")  # fmt: skip
    add(p, "--parallel", type=int, default=1, help="folds at once on CPU")
    add(p, "--retries", type=int, default=1, help="restarts of a failed fold that wrote a new last.ckpt")
    add(p, "--executor", choices=["local", "slurm"], default="local")
    add(p, "--status", action="store_true", help="print each fold's state, write summary.json, start nothing")
    add(p, "--no-oof", action="store_true", help="do not build the OOF store when every fold is done")
    add(p, "--oof-stride", type=int, default=None, help="stride of the OOF store (default: steel oof's)")
    add(p, "--init-from", default=None,
        help="earlier run dir: fold K starts from its fold K (same split; default: init_from of the config)")  # fmt: skip
    add(p, "--init-part", choices=["full", "encoder"], default=None,
        help="what --init-from copies (default: init_part of the config, else full)")  # fmt: skip
    g = p.add_argument_group("slurm")
    add(g, "--partition", default=None, help="default: the cluster's default partition")
    add(g, "--time", type=int, default=24 * 60, help="minutes per task (a requeued task gets them again)")
    add(g, "--nodes", type=int, default=1)
    add(
        g,
        "--cpus-per-task",
        type=int,
        default=None,
        help="per GPU process (default: min(8, node CPUs / tasks))",
    )
    add(g, "--mem", default=None, help="per node, e.g. 64G (default: the partition's)")
    add(g, "--array-parallelism", type=int, default=10)
    add(g, "--signal-delay", type=int, default=120,
        help="seconds before the time limit at which a fold saves last.ckpt and is requeued")  # fmt: skip
    add(g, "--max-requeues", type=int, default=3, help="requeues of a fold that reaches its time limit")
    add(g, "--dry-run", action="store_true",
        help="write RUN_DIR/slurm/array.sbatch (exactly what would be submitted; works with sbatch), submit nothing")  # fmt: skip
    p.add_argument(
        "overrides", nargs=argparse.REMAINDER, help="-- then LightningCLI overrides for every fold"
    )


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides or [])
    if overrides and overrides[0] == "--":
        overrides = overrides[1:]
    check_overrides(overrides)
    if args.executor == "slurm" and args.gpus:
        raise SteelError("--gpus picks GPUs of this machine; with --executor slurm ask for --gpus-per-fold N")
    cfg = _experiment(args.config)
    experiment = Path(args.config).stem
    data_cfg = (cfg.get("data") or {}).get("init_args", cfg.get("data") or {})
    data_dir = args.data_dir or _override(overrides, "data.data_dir") or data_cfg.get("data_dir")
    if data_dir is None:
        raise SteelError("no data dir: pass --data-dir or set data.data_dir in the config")
    if not Path(data_dir, "train_images").is_dir():
        raise SteelError(f"{data_dir}: no train_images/ (make data with `steel synth` or download Kaggle's)")
    if _override(overrides, "data.data_dir") is None:
        overrides = [*overrides, "--data.data_dir", str(data_dir)]
    folds_csv = args.folds_csv or _override(overrides, "data.folds_csv") or data_cfg.get("folds_csv")
    overrides = _drop(overrides, "data.folds_csv")
    if args.init_from:
        overrides = [*_drop(overrides, "init_from"), "--init_from", str(args.init_from)]
    if args.init_part:
        overrides = [*_drop(overrides, "init_part"), "--init_part", args.init_part]
    init_from = _override(overrides, "init_from") or cfg.get("init_from")
    init_from = None if str(init_from).lower() in ("", "null", "none") else init_from
    run_dir = Path(args.run_dir or Path("runs") / experiment)
    if folds_csv is not None or (run_dir / FOLDS_FILE).is_file():  # refused before the run dir is made
        from steel.folds import load_folds

        parse_folds(args.folds, int(load_folds(folds_csv or run_dir / FOLDS_FILE)["fold"].max()) + 1)
    gpus = parse_gpus(args.gpus)
    if gpus and not args.status:
        check_gpus(gpus)
    split = prepare_run_dir(run_dir, args.config, folds_csv, overrides)
    n_folds = int(split["fold"].max()) + 1
    folds = [Fold(k, run_dir / f"fold-{k}") for k in parse_folds(args.folds, n_folds)]
    refuse_other_split(folds, run_dir)
    if not args.status:
        from steel.stages import check_lineage, check_stage

        if init_from:
            check_stage(init_from, run_dir, [f.k for f in folds])
        check_lineage(run_dir, [f.k for f in folds], init_from)
    for f in folds:
        if fold_done(f.dir):
            f.state, f.info = "done", read_json(f.dir / METRICS_FILE)
            print(f"fold {f.k}: already done (best val/dice {_fmt(f.info.get('best_val_dice'))}), skipped")
    if args.executor == "slurm":
        return run_slurm(args, folds, run_dir, overrides, n_folds, experiment)
    if args.status:
        for f in folds:
            if f.state != "done":
                f.state = "partial" if (f.dir / "last.ckpt").is_file() else "not run"
        print(table(folds))
        summarise(run_dir, folds, experiment, "local", log_wandb=False)
        return 0
    launcher = LocalLauncher(folds, args.config, run_dir, overrides, gpus, 1 if args.gpus_per_fold is None else args.gpus_per_fold,
                             args.parallel, args.retries, experiment=experiment)  # fmt: skip
    old = signal.signal(signal.SIGTERM, _sigterm)
    try:
        launcher.run()
    except KeyboardInterrupt:
        print(
            "launch: interrupted; fold processes stopped. Run the same command again to resume.",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
    print(launcher.table())
    summary = summarise(run_dir, folds, experiment, "local")
    if summary["cv_mean"] is not None:
        n_done = sum(f.state == "done" for f in folds)
        print(f"CV best val/dice: {summary['cv_mean']:.4f} +- {summary['cv_std']:.4f} over {n_done} fold(s)")
    if summary["failed"]:
        for f in folds:
            if f.state == "failed":
                print(f"launch: fold {f.k} failed: {f.cause} (log {f.dir / 'train.log'})", file=sys.stderr)
        return 1
    build_oof_if_complete(args, run_dir, n_folds)
    return 0
