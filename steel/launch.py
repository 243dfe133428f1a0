"""Fold orchestration: run the folds of an experiment on local GPUs / CPU or as a SLURM array, with resume.

Each fold is one ``steel fit`` process writing ``RUN_DIR/fold-K/``; a fold with ``done.json`` is skipped,
a fold that died resumes from its ``last.ckpt``, a failed fold is retried ``--retries`` times. When every
fold of the split is done the OOF store is built (``steel oof``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
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


def parse_folds(spec: str | None, n_folds: int) -> list[int]:
    """'0-9', '0,2,5', '1-3,7' or None (all) -> sorted fold numbers; SteelError outside 0..n_folds-1."""
    if not spec:
        return list(range(n_folds))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            a, _, b = part.partition("-")
            out.update(range(int(a), int(b or a) + 1))
    except ValueError:
        raise SteelError(f"--folds {spec!r}: expected e.g. 0-9 or 0,2,5") from None
    bad = sorted(k for k in out if not 0 <= k < n_folds)
    if bad:
        raise SteelError(f"--folds {spec!r}: fold {bad[0]} outside 0..{n_folds - 1} of the split")
    return sorted(out)


def parse_gpus(spec: str | None) -> list[str]:
    """'0,1,2,3' -> ['0', '1', '2', '3']; None/'' -> []."""
    return [g.strip() for g in spec.split(",") if g.strip()] if spec else []


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


@dataclass
class Fold:
    """State of one fold while the launcher runs it."""

    k: int
    dir: Path
    state: str = "queued"  # queued | running | done | failed | skipped
    attempts: int = 0
    proc: subprocess.Popen | None = None
    slot: int | None = None
    started: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def progress(self) -> dict[str, Any]:
        for name in ("metrics.json", "progress.json"):
            p = self.dir / name
            if p.is_file():
                try:
                    return json.loads(p.read_text())
                except (OSError, ValueError):
                    pass
        return {}


def fold_command(
    config: str, k: int, run_dir: Path, overrides: list[str], devices: int, accelerator: str
) -> list[str]:
    """The ``steel fit`` command line of fold k (resuming from last.ckpt when there is one)."""
    fold_dir = run_dir / f"fold-{k}"
    cmd = [sys.executable, "-m", "steel.cli", "fit", "--config", str(config), *overrides,
           "--data.folds_csv", str(run_dir / "folds.csv"), "--data.fold", str(k), "--run_dir", str(fold_dir),
           "--trainer.accelerator", accelerator, "--trainer.devices", str(devices)]  # fmt: skip
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp"]
    if (fold_dir / "last.ckpt").is_file():
        cmd += ["--ckpt_path", str(fold_dir / "last.ckpt")]
    return cmd


def _fmt(v: Any) -> str:
    """A dice value for the progress table: 4 decimals, or '-' before the first validation."""
    return f"{v:.4f}" if isinstance(v, int | float) else "-"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the fold process gets SIGTERM if the launcher dies, even by SIGKILL."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class LocalLauncher:
    """Runs fold processes in slots: GPU groups (CUDA_VISIBLE_DEVICES) or CPU processes."""

    def __init__(self, folds: list[Fold], config: str, run_dir: Path, overrides: list[str], gpus: list[str],
                 gpus_per_fold: int, parallel: int, retries: int, poll: float = 1.0) -> None:  # fmt: skip
        self.folds, self.config, self.run_dir, self.overrides = folds, config, run_dir, overrides
        self.retries, self.poll = retries, poll
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
        if not self.slots[slot] and len(self.slots) > 1:  # CPU folds side by side share the cores
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(self.slots))))
        f.dir.mkdir(parents=True, exist_ok=True)
        log = open(f.dir / "train.log", "a")  # noqa: SIM115 - closed when the process ends
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
        metrics = f.dir / "metrics.json"
        if rc == 0 and metrics.is_file():
            f.info = read_json(metrics)
            write_json(
                f.dir / "done.json", {"fold": f.k, "attempts": f.attempts, "finished": time.time(), **f.info}
            )
            f.state = "done"
            print(f"fold {f.k}: done, best val/dice {_fmt(f.info.get('best_val_dice'))}", flush=True)
        elif f.attempts <= self.retries:
            f.state = "queued"
            print(
                f"fold {f.k}: exited {rc}; retry {f.attempts}/{self.retries} (see {f.dir / 'train.log'})",
                flush=True,
            )
        else:
            f.state = "failed"
            print(
                f"fold {f.k}: FAILED (exit {rc}) after {f.attempts} attempt(s); see {f.dir / 'train.log'}",
                flush=True,
            )

    def table(self) -> str:
        rows = ["fold  state    epoch  val/dice  best"]
        for f in self.folds:
            p = f.info or f.progress()
            ep = p.get("epoch", p.get("best_epoch", ""))
            rows.append(
                f"{f.k:>4}  {f.state:<8} {ep!s:>5}  {_fmt(p.get('val_dice')):>8}  {_fmt(p.get('best_val_dice'))}"
            )
        return "\n".join(rows)

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
    target = run_dir / "folds.csv"
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


def summarise(run_dir: Path, folds: list[Fold], experiment: str) -> dict[str, Any]:
    """CV mean/std of best val/dice over done folds -> summary.json (+ a W&B group-level run)."""
    done = [f for f in folds if f.state in ("done", "skipped")]
    scores = np.array(
        [v if isinstance(v := f.info.get("best_val_dice"), int | float) else np.nan for f in done], float
    )
    summary = {
        "experiment": experiment,
        "folds": {
            str(f.k): {"state": f.state, "best_val_dice": f.info.get("best_val_dice"), "attempts": f.attempts}
            for f in folds
        },
        "cv_mean": float(np.nanmean(scores)) if len(scores) else None,
        "cv_std": float(np.nanstd(scores)) if len(scores) else None,
        "failed": [f.k for f in folds if f.state == "failed"],
    }
    write_json(run_dir / "summary.json", summary)
    try:
        import wandb

        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "steel"), group=experiment, name="summary",
                         job_type="summary", dir=str(run_dir), reinit=True, config={"folds": len(folds)})  # fmt: skip
        table = wandb.Table(columns=["fold", "state", "best_val_dice"],
                            data=[[f.k, f.state, f.info.get("best_val_dice")] for f in folds])  # fmt: skip
        run.log({"folds": table})
        run.summary.update({"cv/mean_dice": summary["cv_mean"], "cv/std_dice": summary["cv_std"]})
        run.finish()
    except Exception as e:  # noqa: BLE001 - W&B trouble must not lose the run
        print(f"launch: W&B summary not logged ({e})", file=sys.stderr)
    return summary


def slurm_jobs(
    folds: list[Fold], config: str, run_dir: Path, overrides: list[str], gpus_per_fold: int
) -> list[list[str]]:
    """Per-fold commands of a SLURM array (Lightning picks up the SLURM env for multi-node DDP)."""
    accelerator = "gpu" if gpus_per_fold else "cpu"
    return [fold_command(config, f.k, run_dir, overrides, max(1, gpus_per_fold), accelerator) for f in folds]


def submit_slurm(args: argparse.Namespace, folds: list[Fold], run_dir: Path, overrides: list[str]) -> int:
    """Submit one SLURM array task per fold with submitit (or, with --dry-run, write the sbatch script only)."""
    import submitit
    from submitit.slurm.slurm import _make_sbatch_string

    todo = [f for f in folds if f.state == "queued"]
    if not todo:
        print("launch: every fold is already done")
        return 0
    if args.nodes > 1:  # multi-node DDP: Lightning reads the SLURM env of each task
        overrides = [*overrides, "--trainer.num_nodes", str(args.nodes)]
    cmds = slurm_jobs(todo, args.config, run_dir, overrides, args.gpus_per_fold)
    folder = run_dir / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(nodes=args.nodes, ntasks_per_node=max(1, args.gpus_per_fold), gpus_per_node=args.gpus_per_fold or None,
                  cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time, mem=args.mem)  # fmt: skip
    write_text(folder / "commands.txt", "".join(f"fold {f.k}: {shlex.join(c)}\n" for f, c in zip(todo, cmds)))
    sbatch = _make_sbatch_string(command=f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}",
                                 folder=str(folder), job_name=f"steel-{run_dir.name}", map_count=len(todo),
                                 array_parallelism=args.array_parallelism, **params)  # fmt: skip
    write_text(folder / "array.sbatch", sbatch)
    if args.dry_run:
        print(
            f"launch: dry run; array of {len(todo)} fold(s) written to {folder / 'array.sbatch'} and {folder / 'commands.txt'}"
        )
        return 0
    executor = submitit.AutoExecutor(folder=str(folder), cluster=args.cluster)
    executor.update_parameters(slurm_partition=args.partition, timeout_min=args.time, nodes=args.nodes,
                               tasks_per_node=max(1, args.gpus_per_fold), gpus_per_node=args.gpus_per_fold,
                               cpus_per_task=args.cpus_per_task, slurm_array_parallelism=args.array_parallelism,
                               name=f"steel-{run_dir.name}")  # fmt: skip
    if args.mem:
        executor.update_parameters(slurm_mem=args.mem)
    with executor.batch():  # one array job, a task per fold
        jobs = [executor.submit(submitit.helpers.CommandFunction(c, cwd=os.getcwd())) for c in cmds]
    for f, j in zip(todo, jobs):
        print(f"fold {f.k}: submitted as job {j.job_id}")
    write_json(folder / "jobs.json", {str(f.k): j.job_id for f, j in zip(todo, jobs)})
    print(
        "launch: when the array has finished, run the same command again: it marks the finished folds done and builds the OOF store"
    )
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML (experiments/NAME.yaml)")
    p.add_argument(
        "--folds", default=None, help="folds to run, e.g. 0-9 or 0,3,5 (default: all of the split)"
    )
    p.add_argument(
        "--folds-csv", default=None, help="fold assignment CSV (default: data.folds_csv of the config)"
    )
    p.add_argument("--data-dir", default=None, help="data directory (default: data.data_dir of the config)")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<config name>)")
    p.add_argument("--gpus", default=None, help="GPU ids to use, e.g. 0,1,2,3 (default: CPU)")
    p.add_argument("--gpus-per-fold", type=int, default=1, help="GPUs per fold; > 1 trains a fold with DDP")
    p.add_argument("--parallel", type=int, default=1, help="folds at once on CPU")
    p.add_argument("--retries", type=int, default=1, help="restarts of a failed fold")
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--no-oof", action="store_true", help="do not build the OOF store when every fold is done")
    p.add_argument(
        "--oof-stride", type=int, default=None, help="stride of the OOF store (default: steel oof's)"
    )
    g = p.add_argument_group("slurm")
    g.add_argument("--partition", default=None)
    g.add_argument("--time", type=int, default=24 * 60, help="minutes per fold")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--cpus-per-task", type=int, default=8)
    g.add_argument("--mem", default=None, help="e.g. 64G")
    g.add_argument("--array-parallelism", type=int, default=10)
    g.add_argument(
        "--cluster", default=None, help="submitit cluster: slurm (default when sbatch exists), local, debug"
    )
    g.add_argument(
        "--dry-run", action="store_true", help="write the sbatch array script and commands, submit nothing"
    )
    p.add_argument(
        "overrides", nargs=argparse.REMAINDER, help="-- then LightningCLI overrides for every fold"
    )


def main(args: argparse.Namespace) -> int:
    overrides = [a for a in args.overrides if a != "--"] if args.overrides else []
    cfg = _experiment(args.config)
    data_cfg = (cfg.get("data") or {}).get("init_args", cfg.get("data") or {})
    data_dir = args.data_dir or _override(overrides, "data.data_dir") or data_cfg.get("data_dir")
    if data_dir is None:
        raise SteelError("no data dir: pass --data-dir or set data.data_dir in the config")
    if not Path(data_dir, "train_images").is_dir():
        raise SteelError(f"{data_dir}: no train_images/ (make data with `steel synth` or download Kaggle's)")
    overrides = (
        [*overrides, "--data.data_dir", str(data_dir)]
        if _override(overrides, "data.data_dir") is None
        else overrides
    )
    folds_csv = args.folds_csv or _override(overrides, "data.folds_csv") or data_cfg.get("folds_csv")
    overrides = _drop(overrides, "data.folds_csv")
    run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
    split = prepare_run_dir(run_dir, args.config, folds_csv, overrides)
    n_folds = int(split["fold"].max()) + 1
    folds = [Fold(k, run_dir / f"fold-{k}") for k in parse_folds(args.folds, n_folds)]
    for f in folds:
        if (
            not (f.dir / "done.json").is_file()
            and (f.dir / "metrics.json").is_file()
            and (f.dir / "best.ckpt").is_file()
        ):
            # finished outside this launcher (a SLURM task, a manual `steel fit`): metrics.json is written at fit end
            write_json(
                f.dir / "done.json",
                {"fold": f.k, "attempts": 0, "finished": time.time(), **read_json(f.dir / "metrics.json")},
            )
        if (f.dir / "done.json").is_file():
            f.state, f.info = "skipped", read_json(f.dir / "done.json")
            print(f"fold {f.k}: already done (best val/dice {_fmt(f.info.get('best_val_dice'))}), skipped")
    if args.executor == "slurm" and any(f.state == "queued" for f in folds):
        return submit_slurm(args, folds, run_dir, overrides)
    launcher = LocalLauncher(folds, args.config, run_dir, overrides, parse_gpus(args.gpus), args.gpus_per_fold,
                             args.parallel, args.retries)  # fmt: skip
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
    summary = summarise(run_dir, folds, Path(args.config).stem)
    if summary["cv_mean"] is not None:
        print(
            f"CV best val/dice: {summary['cv_mean']:.4f} +- {summary['cv_std']:.4f} over {len(folds) - len(summary['failed'])} fold(s)"
        )
    if summary["failed"]:
        print(f"launch: fold(s) {summary['failed']} failed", file=sys.stderr)
        return 1
    all_done = all((run_dir / f"fold-{k}" / "done.json").is_file() for k in range(n_folds))
    if all_done and not args.no_oof:
        from steel.oof import build_oof

        build_oof(run_dir, stride=args.oof_stride)
    elif not all_done:
        print(f"launch: OOF waits until all {n_folds} folds of the split are done")
    return 0


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
