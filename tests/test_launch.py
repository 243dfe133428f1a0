"""steel launch: fold processes on CPU, queueing on GPU slots, kill + resume, retries only where they can help,
refusals before anything runs (reversed ranges, launch options after --, missing GPUs, another split), the SLURM
dry run without a cluster, and the W&B lineage of every stage (read from the offline run files).

Every launch here says --executor local: with sbatch on PATH (CI starts a SLURM cluster) that is not implied."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from steel.errors import SteelError
from steel.launch import Fold, LocalLauncher, error_line, parse_folds, parse_gpus
from steel.oof import OOFStore
from steel.rundir import fold_done
from tests.conftest import make_synth, run_steel, steel_in_process

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.yaml"
# the launched folds: 2 epochs of one step (12 whole 32x160 images, batches of 8), validated after each epoch
LAUNCH_SHAPE = (32, 160)
FAST = ["--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1", "--data.batch_size", "8",
        "--data.train_crop", "null", "--trainer.log_every_n_steps", "1"]  # fmt: skip

# a fake `steel fit` that leaves a finished fold (fold_done: best.ckpt, last.ckpt, metrics.json "complete")
FINISHED_FOLD = (
    "import json, os, sys, time; d = sys.argv[1]; os.makedirs(d, exist_ok=True); time.sleep(0.3);"
    "[open(os.path.join(d, n), 'w').write('x') for n in ('best.ckpt', 'last.ckpt')];"
    "json.dump({'complete': True, 'best_val_dice': 0.5, 'cvd': os.environ['CUDA_VISIBLE_DEVICES'],"
    " 'devices': sys.argv[2], 'job_type': os.environ.get('WANDB_JOB_TYPE')}, open(os.path.join(d, 'metrics.json'), 'w'))"
)


def test_parse_folds_and_gpus():
    assert parse_folds("0-2,5", 10) == [0, 1, 2, 5] and parse_folds(None, 3) == [0, 1, 2]
    with pytest.raises(SteelError, match="fold 10 outside 0..9"):
        parse_folds("8-10", 10)
    with pytest.raises(SteelError, match="expected e.g. 0-9"):
        parse_folds("a-b", 10)
    with pytest.raises(SteelError, match=r"range 3-1 is reversed \(write 1-3\)"):
        parse_folds("3-1", 10)
    for empty in ("", "0,,2", "-"):
        with pytest.raises(SteelError, match="expected e.g. 0-9"):
            parse_folds(empty, 10)
    assert parse_gpus("0, 1,3") == ["0", "1", "3"] and parse_gpus(None) == []


def test_error_line_picks_the_cause():
    tb = "Traceback (most recent call last):\n  File x\npytorch_lightning.utilities.exceptions.MisconfigurationException: No supported gpu backend found!\n"
    assert (
        error_line("# attempt 1: steel fit\n" + tb)
        == "MisconfigurationException: No supported gpu backend found!"
    )
    assert (
        error_line("usage: steel fit\nsteel fit: error: data/x: no train_images/\n")
        == "data/x: no train_images/"
    )
    assert error_line('usage: ...\nerror: Parser key "trainer.max_epoch": not expected\n').startswith(
        "Parser key"
    )
    assert error_line("") == "no output"


def test_gpu_slots_queue_folds_with_their_devices(tmp_path, monkeypatch):
    """4 GPUs, 2 per fold, 5 folds: two at a time, each process sees only its pair (real processes)."""
    import steel.launch as launch

    def fake_command(config, k, run_dir, overrides, devices, accelerator):
        return [sys.executable, "-c", FINISHED_FOLD, str(run_dir / f"fold-{k}"), f"{accelerator}:{devices}"]

    monkeypatch.setattr(launch, "fold_command", fake_command)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    folds = [Fold(k, tmp_path / f"fold-{k}") for k in range(5)]
    lnch = LocalLauncher(folds, "x.yaml", tmp_path, [], ["0", "1", "2", "3"], 2, 1, retries=0, poll=0.05)
    assert lnch.slots == [["0", "1"], ["2", "3"]]
    lnch.run(table_every=1e9)
    seen = [json.loads((tmp_path / f"fold-{k}" / "metrics.json").read_text()) for k in range(5)]
    assert all(f.state == "done" for f in folds) and all(fold_done(f.dir) for f in folds)
    assert {s["cvd"] for s in seen} == {"0,1", "2,3"} and {s["devices"] for s in seen} == {"gpu:2"}
    assert {s["job_type"] for s in seen} == {"train"}  # the fold's W&B run is a train run


def test_failed_fold_is_retried_only_after_progress(tmp_path, monkeypatch, capsys):
    """A fold that fails before writing a last.ckpt would fail the same way again: no retry, the cause in one
    line. A fold that wrote a new last.ckpt before dying is retried (it resumes from there)."""
    import steel.launch as launch

    counter = tmp_path / "attempts"

    def fake_command(config, k, run_dir, overrides, devices, accelerator):
        d = run_dir / f"fold-{k}"
        code = (f"import os; p = {str(counter)!r}; open(p, 'a').write('x'); d = {str(d)!r}\n"
                f"if {k} == 1: open(os.path.join(d, 'last.ckpt'), 'a').write('x')\n"
                "raise ValueError('no supported gpu backend found')")  # fmt: skip
        return [sys.executable, "-c", code]

    monkeypatch.setattr(launch, "fold_command", fake_command)
    folds = [Fold(0, tmp_path / "fold-0")]
    LocalLauncher(folds, "x.yaml", tmp_path, [], [], 1, 1, retries=2, poll=0.05).run(table_every=1e9)
    out = capsys.readouterr().out
    assert folds[0].state == "failed" and counter.read_text() == "x"  # one attempt
    assert "fold 0: FAILED (exit 1) after 1 attempt(s) (no new last.ckpt" in out
    assert "ValueError: no supported gpu backend found" in out and folds[0].cause.startswith("ValueError")
    counter.unlink()
    folds = [Fold(1, tmp_path / "fold-1")]
    LocalLauncher(folds, "x.yaml", tmp_path, [], [], 1, 1, retries=2, poll=0.05).run(table_every=1e9)
    assert folds[0].state == "failed" and counter.read_text() == "xxx"  # 1 + 2 retries, each made progress


def test_slurm_request_checks_against_partitions():
    """sinfo fields as SLURM prints them -> GPUs, minutes, MB; requests no node can run are refused in one line."""
    from steel.slurm import Partition, Request, check_request, gres_gpus, parse_mem_mb, parse_minutes

    assert [gres_gpus(g) for g in ("gpu:4", "gpu:a100:4(S:0-1)", "gpu:2,shard:8", "(null)", "shard:8")] == [
        4,
        4,
        2,
        0,
        0,
    ]
    assert [parse_minutes(t) for t in ("infinite", "30", "30:00", "12:00:00", "1-12:00:00", "0:30")] == [
        None, 30, 30, 720, 2160, 1]  # fmt: skip
    assert [parse_mem_mb(m) for m in ("64G", "64GB", "500M", "1T", "2048")] == [
        65536,
        65536,
        500,
        1048576,
        2048,
    ]
    with pytest.raises(SteelError, match="--mem '64Q': expected e.g. 64G"):
        parse_mem_mb("64Q")
    parts = {"cpu": Partition("cpu", True, 4, 32, 128000, 0, "(null)", None),
             "gpu": Partition("gpu", False, 2, 64, 512000, 8, "gpu:a100:8", 720)}  # fmt: skip

    def req(**kw):
        base = dict(partition=None, time_min=60, nodes=1, tasks_per_node=1, gpus_per_node=0, cpus_per_task=8,
                    mem=None, array_parallelism=10, signal_delay_s=120, max_requeues=3, job_name="x")  # fmt: skip
        return Request(**{**base, **kw})

    assert check_request(req(), parts).name == "cpu"  # the default partition
    assert (
        check_request(req(partition="gpu", gpus_per_node=8, tasks_per_node=8, mem="500G"), parts).name
        == "gpu"
    )
    for kw, msg in [
        (dict(gpus_per_node=1), "partition cpu has no GPUs (sinfo GRES (null))"),
        (dict(partition="gpu", gpus_per_node=16, tasks_per_node=16), "largest node of partition gpu has 8 GPUs"),
        (dict(cpus_per_task=40), "--cpus-per-task 40 x 1 task(s) per node = 40 CPUs, but the largest node of partition cpu has 32"),
        (dict(partition="gpu", gpus_per_node=8, tasks_per_node=8, cpus_per_task=9), "9 x 8 task(s) per node = 72 CPUs"),
        (dict(mem="200G"), "--mem 200G: the largest node of partition cpu has 128000 MB"),
        (dict(nodes=5), "--nodes 5: partition cpu has 4 node(s)"),
        (dict(partition="gpu", time_min=721), "--time 721: partition gpu allows at most 720 minutes"),
        (dict(partition="tpu"), "--partition tpu: no such partition (sinfo lists cpu, gpu)"),
    ]:  # fmt: skip
        with pytest.raises(SteelError, match=re.escape(msg)):
            check_request(req(**kw), parts)


def _launch(*args: object, check: bool = False) -> subprocess.CompletedProcess:
    """``steel launch --config tiny.yaml ARGS`` in this process (refusals; a real process: the case above)."""
    return steel_in_process("launch", "--config", TINY, *args, check=check)


def test_bad_launch_input_is_one_line(tmp_path, synth_dir, folds_csv):
    """Each refused before any fold starts: exit 2, one line naming the value. In this process (``steel.cli.main``
    returns the status); the first case once more as a real process: its exit status and its whole stderr."""
    common = ["--config", TINY, "--data-dir", synth_dir, "--folds-csv", folds_csv, "--executor", "local"]
    cases = [
        (["--config", tmp_path / "nope.yaml"], "nope.yaml: experiment config not found"),
        ([*common, "--run-dir", tmp_path / "r1", "--folds", "0-5"], "fold 3 outside 0..2"),
        ([*common, "--run-dir", tmp_path / "r2", "--folds", "2-0"], "range 2-0 is reversed (write 0-2)"),
        ([*common, "--run-dir", tmp_path / "r3", "--", "--trainer.max_epochs", "1", "--gpus-per-fold", "1"],
         "--gpus-per-fold is a `steel launch` option but comes after `--`"),
        ([*common, "--run-dir", tmp_path / "r4", "--", "--folds=0"], "--folds is a `steel launch` option"),
        ([*common, "--run-dir", tmp_path / "r5", "--folds", "0", "--gpus", "0"],
         "--gpus 0: this machine has no CUDA GPU that torch can use"),
    ]  # fmt: skip
    runs = [(args, msg, steel_in_process("launch", *args, check=False)) for args, msg in cases]
    runs.append((*cases[0], run_steel("launch", *cases[0][0], check=False)))  # the first, as a real process
    for args, msg, proc in runs:
        err = proc.stderr.strip()
        assert proc.returncode == 2, (args, proc.stdout, err)
        assert msg in err and "Traceback" not in err and len(err.splitlines()) == 1, (args, err)
    assert not list(tmp_path.glob("r*"))  # refused before the run dir was made


def test_fold_trained_on_another_split_is_refused(tmp_path, synth_dir, folds_csv):
    from steel.folds import make_folds, split_hash, write_folds
    from steel.labels import read_train
    from steel.rundir import split_of
    from tests._ensemble import save_checkpoint

    other = tmp_path / "other.csv"
    write_folds(make_folds(read_train(synth_dir), 3, seed=7), other)
    run = tmp_path / "run"
    save_checkpoint(run / "fold-1" / "last.ckpt", 0, None, split_of(other, 1))  # fold 1 of another split
    proc = _launch("--data-dir", synth_dir, "--folds-csv", folds_csv, "--run-dir", run, "--executor", "local")
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("steel launch: error: fold 1 of ") and str(run / "fold-1" / "last.ckpt") in err
    assert "another split" in err and split_hash(other) in err and split_hash(folds_csv) in err
    assert not (run / "fold-0").exists()  # nothing ran


def test_slurm_dry_run_without_a_cluster(tmp_path, synth_dir, folds_csv):
    """No SLURM tools on PATH: --dry-run still writes the array that would be submitted (unchecked)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("cp"), bin_dir / "cp")  # all the recording sbatch needs
    run = tmp_path / "run"
    env = dict(os.environ, PATH=str(bin_dir))
    proc = subprocess.run(
        [sys.executable, "-m", "steel.cli", "launch", "--config", str(TINY), "--run-dir", str(run), "--data-dir",
         str(synth_dir), "--folds-csv", str(folds_csv), "--executor", "slurm", "--dry-run", "--partition", "gpu",
         "--gpus-per-fold", "2", "--time", "90", "--folds", "0-2", "--", "--trainer.max_epochs", "30"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run; array of 3 fold(s)" in proc.stdout and "not checked against a cluster" in proc.stderr
    sbatch = (run / "slurm" / "array.sbatch").read_text()
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --ntasks-per-node=2", "#SBATCH --time=90", "#SBATCH --signal=USR2@120",
                 f"#SBATCH --output={run.resolve()}/slurm/%A_%a_0_log.out"):  # fmt: skip
        assert line in sbatch, line
    assert f"-m submitit.core._submit {run.resolve()}/slurm" in sbatch  # absolute folder
    assert '"$sid"_submitted.pkl ] || cp' in sbatch  # a plain sbatch finds each task's pickle
    assert sorted(p.name for p in (run / "slurm").iterdir()) == ["array.sbatch", "commands.txt", "tasks"]
    cmds = (run / "slurm" / "commands.txt").read_text().splitlines()
    assert len(cmds) == 3
    for k, line in enumerate(cmds):
        assert (
            line.startswith(f"fold {k}: steel fit ")
            and f"--data.fold {k} " in line
            and f"--run_dir {run}/fold-{k}" in line
        )
        assert "--trainer.devices 2 --trainer.strategy ddp" in line and "--trainer.max_epochs 30" in line
        assert "SLURMEnvironment" in line and '"auto_requeue": false' in line
    assert (run / "folds.csv").read_text() == Path(folds_csv).read_text()


def _files(d: Path) -> dict[str, float]:
    return {
        str(p.relative_to(d)): p.stat().st_mtime_ns
        for p in d.rglob("*")
        if p.is_file() and "wandb" not in p.parts
    }


@pytest.fixture(scope="module")
def launch_data(tmp_path_factory) -> tuple[Path, Path]:
    """(data dir, folds csv): 24 train images of 32x160 in 2 folds, enough for a launch of real folds."""
    data = make_synth(tmp_path_factory.mktemp("launch_data") / "data", 24, 1, 3, LAUNCH_SHAPE)
    folds = data.parent / "folds.csv"
    steel_in_process("folds", data, "--n-folds", 2, "--seed", 42, "--out", folds)
    return data, folds


@pytest.fixture(scope="module")
def launched(tmp_path_factory, launch_data) -> dict:
    """Real launch of 2 folds on CPU (W&B offline); SIGKILL the launcher (a real process) while fold 1 runs; run
    the same launch again (in this process: the fold processes it starts are real ones all the same)."""
    data, folds = launch_data
    run = tmp_path_factory.mktemp("launch") / "run"
    args = ["launch", "--config", str(TINY), "--run-dir", str(run), "--executor", "local", "--data-dir", str(data),
            "--folds-csv", str(folds), "--oof-stride", "1", "--", *FAST, "--trainer.callbacks+=tests._gate.Gate"]  # fmt: skip
    gate = run / "gate" / "fold-1"  # fold 1 waits at the start of its epoch 1 (tests/_gate.py)
    gate.parent.mkdir(parents=True)
    gate.touch()
    env = dict(os.environ, WANDB_MODE="offline")
    first = subprocess.Popen([sys.executable, "-m", "steel.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and not gate.with_name("fold-1.waiting").exists():
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.5)
    assert (run / "fold-1" / "last.ckpt").is_file()
    done0, done1 = fold_done(run / "fold-0"), fold_done(run / "fold-1")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(2)  # the fold process dies with its parent (PR_SET_PDEATHSIG)
    fold0 = _files(run / "fold-0")
    gate.unlink()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.chdir(ROOT)  # where the fold processes find tests._gate, as the first launch's did
        second = steel_in_process(*args, check=False)
    return {"run": run, "done0": done0, "done1": done1, "fold0": fold0, "second": second}


def test_launch_killed_then_resumed_covers_every_image_once(launched, launch_data):
    run, second = launched["run"], launched["second"]
    folds_csv = launch_data[1]
    assert launched["done0"] and not launched["done1"]
    assert second.returncode == 0, second.stdout + second.stderr
    assert "fold 0: already done" in second.stdout
    assert "fold 1: started on CPU (resuming from last.ckpt)" in second.stdout
    assert _files(run / "fold-0") == launched["fold0"]  # untouched
    assert all(fold_done(run / f"fold-{k}") for k in range(2))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failed"] == [] and summary["cv_mean"] is not None and "CV best val/dice" in second.stdout
    assert {f["state"] for f in summary["folds"].values()} == {"done"}
    store = OOFStore(run)
    split = pd.read_csv(folds_csv)
    assert sorted(store.ids) == sorted(split["ImageId"]) and len(set(store.ids)) == len(store.ids)
    assert np.array_equal(store.folds, split.set_index("ImageId").loc[store.ids, "fold"].to_numpy())
    assert store.masks.shape[-2:] == LAUNCH_SHAPE and store.truth.max() == 1
    assert np.isfinite(store.cls).all() and 0 <= store.cls.min() and store.cls.max() <= 1


def wandb_runs(root: Path, finished: bool = False) -> list[dict]:
    """Every offline W&B run under ``root``: id, job type, group, name, artifacts (name, type, digest, inputs);
    ``finished``: all of them have ended (``wandb_records``)."""
    from tests.conftest_training import wandb_records

    runs = []
    for f in sorted(root.rglob("offline-run-*/run-*.wandb")):
        run: dict = {"dir": f.parent, "artifacts": []}
        for r in wandb_records(f, finished):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run.update(
                    id=r.run.run_id, job_type=r.run.job_type, group=r.run.run_group, name=r.run.display_name
                )
            elif kind == "artifact":
                meta = json.loads(r.artifact.metadata or "{}")
                run["artifacts"].append({"name": r.artifact.name, "type": r.artifact.type, "digest": r.artifact.digest,
                                         "inputs": meta.get("inputs", [])})  # fmt: skip
        runs.append(run)
    return runs


def test_wandb_lineage_of_every_stage(launched, tmp_path, monkeypatch):
    """Fold runs are train runs of the group and log their checkpoints; oof, sweep, blend and export log their own
    runs whose artifacts name their inputs by digest: checkpoints -> OOF -> thresholds -> exported file."""
    run = launched["run"]
    assert launched["second"].returncode == 0
    monkeypatch.setenv("WANDB_MODE", "offline")
    steel_in_process("sweep", run, "--trials", 5)
    ens = tmp_path / "ens"
    steel_in_process("blend", run, "--out", ens)
    exported = tmp_path / "tiny.pt2"
    steel_in_process("export", run, "--out", exported)
    runs = wandb_runs(run, finished=True) + wandb_runs(ens, finished=True)  # in-process runs: all ended
    by_type: dict[str, list] = {}
    for r in runs:
        by_type.setdefault(r["job_type"], []).append(r)
    arts = {a["name"]: a for r in runs for a in r["artifacts"]}
    for k in range(2):  # logged by the launcher into the fold's own (Lightning) run id, once the fold is done
        a = arts[f"run-fold-{k}"]
        producer = next(r for r in by_type["train"] if a in r["artifacts"])
        fold_run = json.loads((run / f"fold-{k}" / "metrics.json").read_text())["wandb_run_id"]
        assert a["type"] == "model" and (producer["id"], producer["group"], producer["name"]) == (
            fold_run,
            "tiny",
            f"fold-{k}",
        )
        assert any(
            r["id"] == fold_run and not r["artifacts"] for r in by_type["train"]
        )  # the training itself
    oof = arts["run-oof"]
    assert by_type["oof"] and {i["digest"] for i in oof["inputs"]} == {
        arts[f"run-fold-{k}"]["digest"] for k in range(2)
    }
    thr = arts["run-thresholds"]
    assert [i["digest"] for i in thr["inputs"]] == [oof["digest"]] and by_type["sweep"]
    assert (
        by_type["blend"] and arts["ens-oof"]["inputs"] == oof["inputs"]
    )  # the blend of one run: its checkpoints
    exp = arts["tiny.pt2"]
    assert exp["type"] == "exported-model" and by_type["export"]
    assert thr["digest"] in {i["digest"] for i in exp["inputs"]}
