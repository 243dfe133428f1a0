"""SLURM executor of ``steel launch``: one job array per launch, through submitit's public API only.

- ``partitions`` / ``check_request``: what the partition's nodes have (``sinfo``: CPUs, memory, GPU GRES, time
  limit); a request no node can satisfy is refused before anything is submitted.
- ``job_states``: where a fold's job is (``squeue``; finished jobs from ``scontrol``, then ``sacct``).
- ``FoldTask`` (a ``submitit.helpers.Checkpointable``): what each array task runs. It trains its fold in the job
  process (``steel fit`` through ``SteelCLI``), resuming from ``fold-K/last.ckpt``, and records its state in
  ``fold-K/slurm.json``. One signal carries the time limit: SLURM sends submitit's SIGUSR2 ``--signal-delay``
  seconds before it; ``RequeueOnSignal`` saves last.ckpt at the end of the current batch (all ranks) and then
  calls submitit's handler, which calls ``FoldTask.checkpoint`` and requeues the task (``--max-requeues``).
  Lightning's own SLURM requeue listens to SIGUSR1, which nobody sends.
- ``submit``: ``AutoExecutor(cluster="slurm")`` + ``update_parameters`` + ``submit_array``; the sbatch file is kept
  as ``slurm/array.sbatch``. ``dry_run`` makes the very same submission with a recording ``sbatch`` first on PATH,
  so the file is exactly what would be submitted. Its setup line copies each task's pickle from
  ``slurm/tasks/`` when submitit has not put it in place, so the file also works with a plain ``sbatch``.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from steel.errors import SteelError
from steel.io import read_json, write_json
from steel.rundir import METRICS_FILE, fold_done

RECORD = "slurm.json"  # fold-K/slurm.json: the fold's job as its task saw it
# `steel fit` arguments of a SLURM fold: Lightning's own SLURM requeue (SIGUSR1) off, submitit's SIGUSR2 does it
FIT_ARGS = [
    '--trainer.plugins+={"class_path": "pytorch_lightning.plugins.environments.SLURMEnvironment", '
    '"init_args": {"auto_requeue": false}}'
]
# scheduler states -> the states steel shows (table, summary.json); anything else is shown lower-cased
ACTIVE = {"PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending",
          "REQUEUE_FED": "pending", "RESV_DEL_HOLD": "pending", "SUSPENDED": "pending", "RUNNING": "running",
          "COMPLETING": "running", "RESIZING": "running", "STAGE_OUT": "running", "SIGNALING": "running"}  # fmt: skip
ENDED = {"CANCELLED": "cancelled", "TIMEOUT": "timeout", "FAILED": "failed", "OUT_OF_MEMORY": "failed",
         "NODE_FAIL": "failed", "BOOT_FAIL": "failed", "DEADLINE": "timeout", "PREEMPTED": "cancelled",
         "REVOKED": "cancelled", "SPECIAL_EXIT": "failed", "COMPLETED": "completed"}  # fmt: skip


# ---- what the cluster has -----------------------------------------------------------------------------------
@dataclass
class Partition:
    """The largest node of a partition (CPUs, memory in MB, GPUs), its node count and time limit (minutes)."""

    name: str
    default: bool
    nodes: int
    cpus: int
    mem_mb: int
    gpus: int
    gres: str
    max_time: int | None  # None: unlimited


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SteelError(
            f"`{cmd[0]}` not found: --executor slurm needs the SLURM client tools on PATH"
        ) from None
    except subprocess.TimeoutExpired:
        raise SteelError(
            f"`{shlex.join(cmd)}` did not answer in {timeout:.0f} s (is slurmctld up?)"
        ) from None


def parse_minutes(text: str) -> int | None:
    """SLURM time ("infinite", "30", "30:00", "12:00:00", "1-12:00:00") -> minutes (None: unlimited)."""
    text = text.strip()
    if text.lower() in ("infinite", "unlimited", "n/a", ""):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:  # minutes
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:  # minutes:seconds
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = parts[-3:]
    return (int(days or 0) * 24 + h) * 60 + m + (1 if s else 0)


def parse_mem_mb(text: str) -> int:
    """SLURM memory ("64G", "500M", "64GB", "1T", "2048" = MB) -> MB; SteelError naming the value."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise SteelError(f"--mem {text!r}: expected e.g. 64G, 500M or 2048 (MB)")
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def gres_gpus(gres: str) -> int:
    """GPUs in a sinfo GRES field ("gpu:4", "gpu:a100:4(S:0-1)", "gpu:2,shard:8", "(null)") -> 4, 4, 2, 0."""
    return sum(int(n) for n in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def partitions() -> dict[str, Partition]:
    """Partitions of the cluster (``sinfo`` per node), each described by its largest node."""
    proc = _run(["sinfo", "-h", "-N", "-o", "%N|%P|%c|%m|%G|%l"])
    if proc.returncode != 0:
        raise SteelError(f"sinfo failed: {(proc.stderr or proc.stdout).strip().splitlines()[0]}")
    out: dict[str, Partition] = {}
    for line in proc.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 6:
            continue
        _, name, cpus, mem, gres, limit = fields
        default = name.endswith("*")
        name = name.rstrip("*")
        p = out.setdefault(name, Partition(name, default, 0, 0, 0, 0, gres, parse_minutes(limit)))
        p.nodes += 1
        p.cpus = max(p.cpus, int(re.sub(r"\D", "", cpus) or 0))
        p.mem_mb = max(p.mem_mb, int(re.sub(r"\D", "", mem) or 0))
        if gres_gpus(gres) > p.gpus:
            p.gpus, p.gres = gres_gpus(gres), gres
    if not out:
        raise SteelError("sinfo lists no partitions: is the cluster up?")
    return out


@dataclass
class Request:
    """What each array task asks SLURM for (one task per GPU, or one CPU task, on each node)."""

    partition: str | None
    time_min: int
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    mem: str | None
    array_parallelism: int
    signal_delay_s: int
    max_requeues: int
    job_name: str


def check_request(req: Request, parts: dict[str, Partition]) -> Partition:
    """The partition the request goes to; SteelError (one line) when no node of it can run a task."""
    if req.partition is None:
        default = [p for p in parts.values() if p.default]
        if not default:
            raise SteelError(f"the cluster has no default partition: pass --partition ({', '.join(parts)})")
        part = default[0]
    elif req.partition not in parts:
        raise SteelError(f"--partition {req.partition}: no such partition (sinfo lists {', '.join(parts)})")
    else:
        part = parts[req.partition]
    where = f"partition {part.name}"
    if req.gpus_per_node > 0 and part.gpus == 0:
        raise SteelError(
            f"--gpus-per-fold {req.gpus_per_node}: {where} has no GPUs (sinfo GRES {part.gres}); "
            f"use --gpus-per-fold 0 for CPU folds, or a GPU partition"
        )
    if req.gpus_per_node > part.gpus:
        raise SteelError(
            f"--gpus-per-fold {req.gpus_per_node}: the largest node of {where} has {part.gpus} GPUs ({part.gres})"
        )
    cpus = req.cpus_per_task * req.tasks_per_node
    if cpus > part.cpus:
        raise SteelError(
            f"--cpus-per-task {req.cpus_per_task} x {req.tasks_per_node} task(s) per node = {cpus} CPUs, but the "
            f"largest node of {where} has {part.cpus}"
        )
    if req.mem is not None and parse_mem_mb(req.mem) > part.mem_mb:
        raise SteelError(f"--mem {req.mem}: the largest node of {where} has {part.mem_mb} MB")
    if req.nodes > part.nodes:
        raise SteelError(f"--nodes {req.nodes}: {where} has {part.nodes} node(s)")
    if part.max_time is not None and req.time_min > part.max_time:
        raise SteelError(f"--time {req.time_min}: {where} allows at most {part.max_time} minutes")
    if req.time_min < 1:
        raise SteelError(f"--time {req.time_min}: must be >= 1 minute")
    return part


# ---- where the jobs are -------------------------------------------------------------------------------------
def job_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """Job id ("123" or "123_4") -> (SLURM state, reason): queued/running ones from ``squeue``, finished ones from
    ``scontrol`` (kept MinJobAge seconds) or ``sacct`` (where accounting is on). Ids nobody knows are left out."""
    ids = [str(j) for j in job_ids if j]
    if not ids:
        return {}
    out: dict[str, tuple[str, str]] = {}
    proc = _run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T|%r"])
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        jid, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if jid in ids:
            out[jid] = (state, reason)
    for jid in (j for j in ids if j not in out):
        proc = _run(["scontrol", "-o", "show", "job", jid])
        m = (
            re.search(r"\bJobState=(\S+)(?:.*?\bReason=(\S+))?", proc.stdout)
            if proc.returncode == 0
            else None
        )
        if m:
            out[jid] = (m.group(1), m.group(2) or "")
    rest = [j for j in ids if j not in out]
    if rest:
        proc = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(rest)])
        for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
            jid, _, state = line.strip().partition("|")
            if jid in rest and state:
                out[jid] = (state.split()[0], "")
    return out


def read_record(fold_dir: str | os.PathLike) -> dict[str, Any]:
    """fold-K/slurm.json ({} if none or unreadable)."""
    try:
        rec = read_json(Path(fold_dir) / RECORD)
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def write_record(fold_dir: str | os.PathLike, **fields: Any) -> None:
    """Update fold-K/slurm.json with ``fields`` (atomically) and the time."""
    rec = read_record(fold_dir)
    rec.update(fields, updated=time.time())
    write_json(Path(fold_dir) / RECORD, rec)


def fold_state(fold_dir: Path, job_id: str | None, sched: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """(state, cause) of a fold submitted to SLURM: done | pending | running | cancelled | timeout | failed |
    requeued | terminated | not run. The scheduler's word wins for queued, running, cancelled and timed-out jobs;
    the task's own record says why a job failed, and what happened after the scheduler forgot the job."""
    rec = read_record(fold_dir)
    job_id = job_id or rec.get("job_id")
    if fold_done(fold_dir):
        return "done", ""
    if not job_id:
        return "not run", ""
    state, reason = sched.get(str(job_id), ("", ""))
    cause = rec.get("cause", "") if str(rec.get("job_id")) == str(job_id) else ""
    if state in ACTIVE:
        return ACTIVE[state], reason if reason not in ("None", "") else ""
    if state in ("CANCELLED", "TIMEOUT", "DEADLINE", "PREEMPTED", "REVOKED"):
        mine = rec.get("state") if str(rec.get("job_id")) == str(job_id) else None
        return ENDED[state], f"SLURM job {job_id} {state}" + (
            f"; {cause}" if mine == "timeout" and cause else ""
        )
    if state:  # FAILED, COMPLETED without a finished fold, ...
        mine = rec.get("state") if str(rec.get("job_id")) == str(job_id) else None
        if mine in ("failed", "timeout"):
            return mine, cause
        return "failed", cause or f"SLURM job {job_id} ended {state} without a finished fold"
    if str(rec.get("job_id")) == str(job_id) and rec.get("state") not in (None, "running", "done"):
        return rec["state"], cause
    if str(rec.get("job_id")) == str(job_id) and rec.get("state") == "running":
        return (
            "terminated",
            "ended while running (cancelled, timed out or its node lost; SLURM no longer knows)",
        )
    return "not run", f"job {job_id} never started, and SLURM no longer knows it"


# ---- the task ------------------------------------------------------------------------------------------------
class RequeueOnSignal:
    """Turns submitit's requeue signal into "save last.ckpt at the end of this batch, then requeue"; ``callback``
    is its Lightning side (built there, so that ``steel launch`` itself never imports Lightning)."""

    def __init__(self, fold_dir: str | os.PathLike, fold: int) -> None:
        self.fold_dir, self.fold = Path(fold_dir), fold
        self.requested = False
        self.started = False  # the trainer reached its first training step
        self.saved_step: int | None = None
        self.signum: int | None = None
        self.handler: Any = None

    def arm(self) -> None:
        """Put a flag-setting handler in front of submitit's (installed before the task runs)."""
        self.signum = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        self.handler = signal.getsignal(self.signum)
        signal.signal(self.signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.requested = True
        if not self.started and callable(self.handler):  # nothing trained yet: nothing to save, requeue now
            print(
                f"fold {self.fold}: {signal.Signals(signum).name} before training started: requeue",
                flush=True,
            )
            self.handler(signum, frame)
            return
        print(f"fold {self.fold}: {signal.Signals(signum).name} (time limit near): checkpoint at the end of this "
              "batch, then requeue", flush=True)  # fmt: skip

    def save_and_requeue(self, trainer: Any) -> None:
        """At a batch end: if any rank got the signal, save last.ckpt (all ranks), then let submitit requeue."""
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        tmp = self.fold_dir / ".last.ckpt.requeue"
        trainer.save_checkpoint(tmp)  # every rank takes part; rank 0 writes
        self.saved_step = trainer.global_step
        if trainer.is_global_zero:
            os.replace(tmp, self.fold_dir / "last.ckpt")
            write_record(
                self.fold_dir,
                state="requeued",
                cause=f"time limit: last.ckpt saved at step {self.saved_step}",
            )
            print(
                f"fold {self.fold}: last.ckpt saved at step {self.saved_step}; handing over to submitit",
                flush=True,
            )
        trainer.strategy.barrier()
        if callable(self.handler):  # submitit: FoldTask.checkpoint, `scontrol requeue`, exit (rank 0 only)
            self.handler(self.signum, None)
        raise SystemExit(0)  # ranks > 0 (and a handler that returned): stop; the requeue restarts the task

    def callback(self) -> Any:
        """A pytorch_lightning Callback that calls ``save_and_requeue`` after every training batch."""
        import pytorch_lightning as pl

        guard = self

        class RequeueCallback(pl.Callback):
            def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
                guard.started = True

            def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
                guard.save_and_requeue(trainer)

        return RequeueCallback()


class FoldTask(submitit.helpers.Checkpointable):
    """One fold in a SLURM task: ``steel fit`` in this process, resumed from last.ckpt, state in slurm.json."""

    def __init__(self, fold: int, fit_args: list[str], fold_dir: str, cwd: str, env: dict[str, str]) -> None:
        self.fold, self.fit_args, self.fold_dir, self.cwd, self.env = (
            fold,
            list(fit_args),
            fold_dir,
            cwd,
            dict(env),
        )

    def __call__(self) -> dict[str, Any]:
        from steel.train_cli import SteelCLI

        job = submitit.JobEnvironment()
        os.chdir(self.cwd)
        os.environ.update({k: v for k, v in self.env.items() if k != "WANDB_MODE"})
        os.environ.setdefault("WANDB_MODE", self.env.get("WANDB_MODE", "offline"))
        os.environ.pop("WANDB_SERVICE", None)  # a wandb service of the submitting process is not ours
        fold_dir = Path(self.fold_dir)
        fold_dir.mkdir(parents=True, exist_ok=True)
        rank0 = job.global_rank == 0
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if rank0:
            write_record(fold_dir, job_id=job.job_id, state="running", cause="", log=str(job.paths.stdout),
                         restarts=restarts, host=job.hostname)  # fmt: skip
        if fold_done(fold_dir):
            print(f"fold {self.fold}: already done", flush=True)
            return read_json(fold_dir / METRICS_FILE)
        args = ["fit", *self.fit_args]
        last = fold_dir / "last.ckpt"
        if last.is_file():
            args += ["--ckpt_path", str(last)]
            print(f"fold {self.fold}: resuming from {last} (restart {restarts})", flush=True)
        guard = RequeueOnSignal(fold_dir, self.fold)
        guard.arm()
        sys.argv = sys.argv[:1]  # LightningCLI reads `args`, not the submitit command line
        try:
            SteelCLI(args=args, trainer_defaults={"callbacks": [guard.callback()]})
        except BaseException as e:
            state, cause = _outcome(e, guard)
            if rank0 and state != "requeued":
                write_record(fold_dir, state=state, cause=cause)
            print(f"fold {self.fold}: {state}: {cause}", file=sys.stderr, flush=True)
            raise
        if rank0:
            write_record(fold_dir, state="done", cause="")
            from steel import tracking

            tracking.log_fold(fold_dir)
        return read_json(fold_dir / METRICS_FILE)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Requeue the same task: its state is last.ckpt, which RequeueOnSignal has just saved."""
        return super().checkpoint(*args, **kwargs)


def _outcome(e: BaseException, guard: RequeueOnSignal) -> tuple[str, str]:
    """(state, one-line cause) of a fold task that raised ``e``."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    if guard.requested:
        if isinstance(e, SystemExit):
            return "requeued", f"time limit: last.ckpt saved at step {guard.saved_step}; requeued"
        if isinstance(e, submitit.core.utils.UncompletedJobError):
            why = str(e).removeprefix("Job not requeued because: ").rstrip(".")
            return (
                "timeout",
                f"time limit, not requeued ({why}); last.ckpt at step {guard.saved_step}: launch again",
            )
    if isinstance(e, SIGTERMException):
        return "terminated", "SIGTERM (scancel, time limit or preemption)"
    if isinstance(e, SteelError):
        return "failed", str(e)
    if isinstance(e, SystemExit):
        return "failed", f"steel fit exited {e.code} (its arguments were rejected? see the log)"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return "failed", f"{type(e).__name__}: {first}"[:300]


# ---- submission ----------------------------------------------------------------------------------------------
def setup_lines(folder: Path, templates: Path) -> list[str]:
    """sbatch setup: a task whose submitit pickle is missing (the file submitted by hand) copies its template.

    The pickle's path is submitit's own (``JobPaths.submitted_pickle`` of the task's job id "ARRAY_TASK")."""
    from submitit.core.utils import JobPaths

    pre, _, post = str(JobPaths(folder, job_id="STEEL-JOB-ID").submitted_pickle).partition("STEEL-JOB-ID")
    pkl = f'{shlex.quote(pre)}"$sid"{shlex.quote(post)}'
    return [
        "# steel: a task started by a plain `sbatch` of this file takes its pickle from the templates",
        "sid=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}; sid=${sid:-$SLURM_JOB_ID}",
        f'[ -e {pkl} ] || cp {shlex.quote(str(templates))}/"${{SLURM_ARRAY_TASK_ID:-0}}.pkl" {pkl}',
    ]


@contextlib.contextmanager
def _recording_sbatch(record: Path) -> Iterator[None]:
    """PATH with an ``sbatch`` that copies the file it is given to ``record`` and submits nothing."""
    with tempfile.TemporaryDirectory(prefix="steel-dry-run-") as d:
        for name, body in (("sbatch", f'cp "$1" {shlex.quote(str(record))} && echo "Submitted batch job 0"\n'),
                           ("srun", "exit 0\n")):  # fmt: skip
            p = Path(d) / name
            p.write_text("#!/bin/sh\n# steel launch --dry-run\n" + body)
            p.chmod(p.stat().st_mode | stat.S_IEXEC)
        old = os.environ.get("PATH", "")
        os.environ["PATH"] = d + os.pathsep + old
        try:
            yield
        finally:
            os.environ["PATH"] = old


def submit(tasks: list[FoldTask], folder: Path, req: Request, dry_run: bool = False) -> tuple[list[str], str]:
    """Submit one task per fold as one array (submitit), or with ``dry_run`` only write its sbatch file.

    Returns (job ids, the sbatch text); the text is also written to ``folder/array.sbatch``."""
    folder = folder.resolve()
    templates = folder / "tasks" / ("folds_" + "_".join(str(t.fold) for t in tasks))
    templates.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(tasks):
        d = submitit.helpers.DelayedSubmission(t)
        d.set_timeout(req.time_min, req.max_requeues)
        d.dump(templates / f"{i}.pkl")
    params: dict[str, Any] = dict(
        name=req.job_name, timeout_min=req.time_min, nodes=req.nodes, tasks_per_node=req.tasks_per_node,
        cpus_per_task=req.cpus_per_task, stderr_to_stdout=True, slurm_array_parallelism=req.array_parallelism,
        slurm_signal_delay_s=req.signal_delay_s, slurm_setup=setup_lines(folder, templates),
    )  # fmt: skip
    if req.gpus_per_node:
        params["gpus_per_node"] = req.gpus_per_node
    if req.partition:
        params["slurm_partition"] = req.partition
    if req.mem:
        params["slurm_mem"] = req.mem
    out = folder / "array.sbatch"
    if dry_run:
        before = set(folder.iterdir())
        record = folder / ".array.sbatch.recorded"
        try:
            with _recording_sbatch(record):
                executor = submitit.AutoExecutor(
                    folder=folder, cluster="slurm", slurm_max_num_timeout=req.max_requeues
                )
                executor.update_parameters(**params)
                executor.submit_array(tasks)
            text = record.read_text()
        finally:  # submitit's files for the pretend job 0
            for p in set(folder.iterdir()) - before:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        ids: list[str] = []
    else:
        executor = submitit.AutoExecutor(
            folder=folder, cluster="slurm", slurm_max_num_timeout=req.max_requeues
        )
        executor.update_parameters(**params)
        try:
            jobs = executor.submit_array(tasks)
        except submitit.core.utils.FailedJobError as e:
            lines = (
                [ln for ln in str(e).splitlines() if "error" in ln.lower()] or str(e).splitlines() or ["?"]
            )
            raise SteelError(f"sbatch refused the array: {lines[-1].strip()}") from None
        ids = [j.job_id for j in jobs]
        text = jobs[0].paths.submission_file.read_text()
    from steel.io import write_text

    write_text(out, text)
    return ids, text
