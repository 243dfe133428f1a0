"""`steel launch --executor slurm` on a real SLURM cluster (CI: .ci/slurm.sh starts a single-node one).

The dry run's sbatch file, submitted by hand, trains two folds; a relaunch while they run is refused; a fold
cancelled with scancel shows as cancelled and resumes from its last.ckpt when launched again, through a file equal
to the dry run's; a relaunch builds the OOF store. A fold reaching its time limit saves last.ckpt at SIGUSR2, is
requeued and resumes, and shows as timed out once out of requeues; a fold that fails shows as failed with its cause.
Requests no node can satisfy are refused before submitting. Skipped (with the reason) without a cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.yaml"
# tiny folds: 3 epochs of 3 batches, validated every epoch, no logger
FIT = ["--trainer.max_epochs", "3", "--trainer.limit_train_batches", "3", "--trainer.check_val_every_n_epoch", "1",
       "--trainer.logger", "false"]  # fmt: skip
ENV = dict(os.environ, WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="")
# W&B offline (the folds' runs and their lineage are checked); tests._gate importable in the jobs
OFFLINE = dict(ENV, WANDB_MODE="offline", PYTHONPATH=str(ROOT))


def _no_cluster() -> str | None:
    """Why the cluster cannot be used, or None."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return 'no sbatch/sinfo on PATH (start a test cluster: eval "$(sudo bash .ci/slurm.sh)")'
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 15 s (no slurmctld?)"
    if proc.returncode != 0:
        return f"SLURM cluster not reachable: {(proc.stderr or proc.stdout).strip()[:200]}"
    if not {"idle", "mixed", "allocated"} & set(proc.stdout.split()):
        return f"no SLURM node is up (sinfo: {proc.stdout.strip()[:200]})"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    """Skip this module, with the reason, when there is no cluster to submit to."""
    reason = _no_cluster()
    if reason:
        pytest.skip(reason)


def steel(*args: object, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steel.cli", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, cwd=ROOT, timeout=timeout)  # fmt: skip


def launch(run: Path, data: Path, folds: Path, *args: object, fit: list[str] = FIT, env: dict | None = None):
    return steel("launch", "--config", TINY, "--executor", "slurm", "--run-dir", run, "--data-dir", data,
                 "--folds-csv", folds, "--cpus-per-task", 1, *args, "--", *fit, env=env)  # fmt: skip


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def refused(proc: subprocess.CompletedProcess, message: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "Traceback" not in err, (proc.returncode, proc.stdout, err)
    assert len(err.splitlines()) == 1 and message in err, err


def wait_for(cond, timeout: float, what: str, poll: float = 0.5):
    """Poll ``cond()`` until truthy (hang guard: ``timeout`` s, >= 10x the time it takes here)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := cond():
            return value
        time.sleep(poll)
    queue = subprocess.run(["squeue", "-h", "-r"], capture_output=True, text=True).stdout
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; squeue:\n{queue}")


def queued(job: str) -> bool:
    """The job (or array) is still in squeue."""
    proc = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%i"], capture_output=True, text=True)
    return proc.returncode == 0 and bool(proc.stdout.strip())


def record(fold_dir: Path) -> dict:
    try:
        return json.loads((fold_dir / "slurm.json").read_text())
    except (OSError, ValueError):
        return {}


def summary_states(run: Path) -> dict[str, str]:
    return {k: v["state"] for k, v in json.loads((run / "summary.json").read_text())["folds"].items()}


@pytest.fixture(scope="module")
def split2(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 folds of the session's synthetic data."""
    out = tmp_path_factory.mktemp("slurm") / "folds2.csv"
    ok(steel("folds", synth_dir, "--n-folds", 2, "--seed", 1, "--out", out))
    return out


@pytest.fixture
def cleanup():
    """Job ids to scancel when the test ends, whatever happened."""
    jobs: list[str] = []
    yield jobs
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True)


def test_requests_no_node_can_run_are_refused_before_submitting(tmp_path, synth_dir, split2):
    run = tmp_path / "run"
    before = subprocess.run(["squeue", "-h", "-r"], capture_output=True, text=True).stdout
    node = subprocess.run(["sinfo", "-h", "-o", "%c %m %P"], capture_output=True, text=True).stdout.split()
    cpus, part = int(node[0]), node[2].rstrip("*")
    refused(
        launch(run, synth_dir, split2, "--gpus-per-fold", 1),
        f"--gpus-per-fold 1: partition {part} has no GPUs",
    )
    refused(
        launch(run, synth_dir, split2, "--cpus-per-task", cpus + 1),
        f"but the largest node of partition {part} has {cpus}",
    )
    refused(
        launch(run, synth_dir, split2, "--mem", "100T"),
        f"--mem 100T: the largest node of partition {part} has",
    )
    refused(
        launch(run, synth_dir, split2, "--partition", "nosuch"),
        "--partition nosuch: no such partition (sinfo lists",
    )
    refused(
        launch(run, synth_dir, split2, fit=["--time", "5"]),
        "--time is a `steel launch` option but comes after `--`",
    )
    after = subprocess.run(["squeue", "-h", "-r"], capture_output=True, text=True).stdout
    assert after == before and not (run / "slurm" / "jobs.json").exists()  # nothing was submitted
    # the defaults fit a CPU partition: no GPUs asked, CPUs within the node
    dry = ok(steel("launch", "--config", TINY, "--executor", "slurm", "--run-dir", run, "--data-dir", synth_dir,
                   "--folds-csv", split2, "--dry-run"))  # fmt: skip
    text = (run / "slurm" / "array.sbatch").read_text()
    assert "gpus" not in text and "0 GPU(s)" in dry.stdout
    assert 1 <= int(re.search(r"--cpus-per-task=(\d+)", text).group(1)) <= cpus


def test_array_cancel_resume_and_oof(tmp_path, synth_dir, split2, cleanup):
    run = tmp_path / "run"
    t0 = time.time()

    def go(*args: object) -> subprocess.CompletedProcess:  # W&B offline: each fold logs a train run
        return launch(
            run,
            synth_dir,
            split2,
            *args,
            fit=[*FIT[:-2], "--trainer.callbacks+=tests._gate.Gate"],
            env=OFFLINE,
        )

    # 1. the dry run's file, submitted by hand, trains both folds
    ok(go("--dry-run"))
    sbatch_file = run / "slurm" / "array.sbatch"
    text = sbatch_file.read_text()
    assert "#SBATCH --array=0-1%2" in text and "#SBATCH --cpus-per-task=1" in text
    gate = run / "gate" / "fold-1"  # fold 1 will wait at the start of its epoch 1 (tests/_gate.py)
    gate.parent.mkdir()
    gate.touch()
    proc = subprocess.run(
        ["sbatch", "--parsable", str(sbatch_file)], capture_output=True, text=True, cwd=tmp_path, env=OFFLINE
    )
    assert proc.returncode == 0, proc.stderr
    array = proc.stdout.strip().split(";")[0]
    cleanup.append(array)
    wait_for(
        lambda: all(record(run / f"fold-{k}").get("state") == "running" for k in (0, 1)),
        300,
        "both tasks to start",
    )
    # 2. a relaunch while they run is refused, naming a running fold: fold 1 waits at the gate, fold 0 may have
    # finished meanwhile on a slow machine (the relaunch's own start takes seconds)
    proc = go()
    refused(proc, "is already running as SLURM job")
    assert re.search(rf"fold ([01]) is already running as SLURM job {array}_\1 ", proc.stderr), proc.stderr
    # 3. cancel fold 1 once it has a resume point; fold 0 finishes
    wait_for(lambda: gate.with_name("fold-1.waiting").exists(), 300, "fold 1 at the gate after its epoch 0")
    assert (run / "fold-1" / "last.ckpt").is_file() and not (run / "fold-1" / "metrics.json").exists()
    subprocess.run(["scancel", f"{array}_1"], check=True)
    wait_for(lambda: not queued(array), 300, "the array to end")
    t_first = time.time() - t0
    # 4. true states: fold 0 done, fold 1 cancelled
    status = ok(go("--status"))
    assert re.search(r"^\s+0  done\b", status.stdout, re.M) and re.search(
        r"^\s+1  cancelled .*CANCELLED", status.stdout, re.M
    ), status.stdout
    assert summary_states(run) == {"0": "done", "1": "cancelled"}
    # 5. relaunch: fold 1 only, through exactly the file a dry run writes; it resumes from its last.ckpt
    gate.unlink()
    ok(go("--dry-run"))
    dry = sbatch_file.read_text()
    sub = ok(go())
    job = re.search(r"fold 1: submitted as SLURM job (\d+) \(resumes from last.ckpt\)", sub.stdout).group(1)
    cleanup.append(job)
    assert "fold 0: already done" in sub.stdout and sbatch_file.read_text() == dry
    wait_for(lambda: not queued(job), 300, "the resumed fold")
    log = Path(record(run / "fold-1")["log"]).read_text()
    assert f"fold 1: resuming from {run / 'fold-1' / 'last.ckpt'}" in log and "Restored all states" in log
    import torch

    last = torch.load(run / "fold-1" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 9 and last["epoch"] == 2  # 3 epochs x 3 batches in all, none trained twice
    # 6. every fold done: the relaunch builds the OOF store
    final = ok(go())
    from steel.oof import OOFStore

    assert len(OOFStore(run)) == 60 and summary_states(run) == {"0": "done", "1": "done"}
    assert "OOF waits" not in final.stdout
    # 7. W&B: each fold's run is a train run of the group and logged its checkpoint; the OOF run names them
    from tests.test_launch import wandb_runs

    runs = wandb_runs(run)
    arts = {a["name"]: a for r in runs for a in r["artifacts"]}
    for k in (0, 1):  # logged from the fold's own (Lightning) run, still open in the task
        producer = next(r for r in runs if arts[f"run-fold-{k}"] in r["artifacts"])
        fold_run = json.loads((run / f"fold-{k}" / "metrics.json").read_text())["wandb_run_id"]
        assert (producer["job_type"], producer["group"], producer["id"]) == ("train", "tiny", fold_run)
    oof_inputs = {i["digest"] for i in arts["run-oof"]["inputs"]}
    assert oof_inputs == {arts["run-fold-0"]["digest"], arts["run-fold-1"]["digest"]}
    print(f"first array {t_first:.0f} s, total {time.time() - t0:.0f} s")


@pytest.mark.slow  # SLURM time limits are whole minutes: >= 1 min of waiting. CI runs it (`make test-slurm-slow`)
def test_time_limit_requeue_resume_and_failed_states(tmp_path, synth_dir, split2, cleanup):
    """--time 1 --signal-delay 15: SIGUSR2 comes 15-45 s into each run (SLURM checks limits every 30 s). A fold
    too long to finish saves last.ckpt, is requeued, resumes, and after --max-requeues 1 shows as timed out.
    Beside it a fold that fails shows its cause."""
    t0 = time.time()
    slow, bad = tmp_path / "slow", tmp_path / "bad"
    # never finishes, however fast the machine: only the time limit ends it
    long_fit = ["--trainer.max_epochs", "100000", "--trainer.limit_train_batches", "4", "--trainer.check_val_every_n_epoch",
                "1", "--trainer.logger", "false"]  # fmt: skip
    sub = ok(launch(slow, synth_dir, split2, "--folds", 0, "--time", 1, "--signal-delay", 15, "--max-requeues", 1,
                    fit=long_fit))  # fmt: skip
    job = re.search(r"fold 0: submitted as SLURM job (\d+)", sub.stdout).group(1)
    cleanup.append(job)
    sub = ok(launch(bad, synth_dir, split2, "--folds", 1, fit=[*FIT, "--data.batch_size", "0"]))
    bad_job = re.search(r"fold 1: submitted as SLURM job (\d+)", sub.stdout).group(1)
    cleanup.append(bad_job)
    wait_for(lambda: not queued(job) and not queued(bad_job), 600, "the timed-out and the failing fold")
    log = Path(record(slow / "fold-0")["log"]).read_text()
    saved = [int(s) for s in re.findall(r"fold 0: last.ckpt saved at step (\d+)", log)]
    assert len(saved) == 2 and 0 < saved[0] < saved[1], log[
        -3000:
    ]  # saved at each signal; the second run went on
    assert "Requeued job" in log and "fold 0: resuming from" in log and "timed-out too many times" in log
    assert (
        log.index("fold 0: resuming from") < log.index("Restored all states") < log.rindex("last.ckpt saved")
    )
    import torch

    assert (
        torch.load(slow / "fold-0" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
        == saved[1]
    )
    status = ok(launch(slow, synth_dir, split2, "--folds", 0, "--status", fit=long_fit)).stdout
    assert re.search(r"^\s+0  timeout .*time limit", status, re.M), status
    assert summary_states(slow) == {"0": "timeout"} and record(slow / "fold-0")["restarts"] == 1
    status = ok(launch(bad, synth_dir, split2, "--folds", 1, "--status")).stdout
    assert re.search(r"^\s+1  failed .*batch_size", status, re.M), status
    assert summary_states(bad) == {"1": "failed"}
    print(f"time-limit and failure test {time.time() - t0:.0f} s")
