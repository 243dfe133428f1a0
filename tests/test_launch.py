"""steel launch: fold processes on CPU, queueing on GPU slots, kill + resume, SLURM array building, OOF."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from steel.errors import SteelError
from steel.launch import Fold, LocalLauncher, parse_folds, parse_gpus
from steel.oof import OOFStore
from tests.conftest import run_steel

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "--trainer.max_epochs",
    "2",
    "--trainer.check_val_every_n_epoch",
    "1",
    "--trainer.logger",
    "CSVLogger",
    "--data.batch_size",
    "8",
    "--trainer.log_every_n_steps",
    "1",
]


def test_parse_folds_and_gpus():
    assert parse_folds("0-2,5", 10) == [0, 1, 2, 5] and parse_folds(None, 3) == [0, 1, 2]
    with pytest.raises(SteelError, match="fold 10 outside 0..9"):
        parse_folds("8-10", 10)
    with pytest.raises(SteelError, match="expected e.g. 0-9"):
        parse_folds("a-b", 10)
    assert parse_gpus("0, 1,3") == ["0", "1", "3"] and parse_gpus(None) == []


def test_gpu_slots_queue_folds_with_their_devices(tmp_path, monkeypatch):
    """4 GPUs, 2 per fold, 5 folds: two at a time, each process sees only its pair (real processes)."""
    import steel.launch as launch

    script = (
        "import json, os, sys, time; d = sys.argv[1]; os.makedirs(d, exist_ok=True); time.sleep(0.3);"
        "json.dump({'best_val_dice': 0.5, 'cvd': os.environ['CUDA_VISIBLE_DEVICES'], 'devices': sys.argv[2]},"
        " open(os.path.join(d, 'metrics.json'), 'w'))"
    )

    def fake_command(config, k, run_dir, overrides, devices, accelerator):
        return [sys.executable, "-c", script, str(run_dir / f"fold-{k}"), f"{accelerator}:{devices}"]

    monkeypatch.setattr(launch, "fold_command", fake_command)
    folds = [Fold(k, tmp_path / f"fold-{k}") for k in range(5)]
    lnch = LocalLauncher(folds, "x.yaml", tmp_path, [], ["0", "1", "2", "3"], 2, 1, retries=0, poll=0.05)
    assert lnch.slots == [["0", "1"], ["2", "3"]]
    lnch.run(table_every=1e9)
    seen = [json.loads((tmp_path / f"fold-{k}" / "metrics.json").read_text()) for k in range(5)]
    assert all(f.state == "done" for f in folds) and all((f.dir / "done.json").is_file() for f in folds)
    assert {s["cvd"] for s in seen} == {"0,1", "2,3"} and {s["devices"] for s in seen} == {"gpu:2"}


def test_failed_fold_is_retried_then_reported(tmp_path, monkeypatch):
    import steel.launch as launch

    counter = tmp_path / "attempts"

    def fake_command(config, k, run_dir, overrides, devices, accelerator):
        code = f"p = {str(counter)!r}; open(p, 'a').write('x'); raise SystemExit(3)"
        return [sys.executable, "-c", code]

    monkeypatch.setattr(launch, "fold_command", fake_command)
    folds = [Fold(0, tmp_path / "fold-0")]
    LocalLauncher(folds, "x.yaml", tmp_path, [], [], 1, 1, retries=2, poll=0.05).run(table_every=1e9)
    assert folds[0].state == "failed" and counter.read_text() == "xxx"


def test_slurm_dry_run_builds_array(tmp_path, synth_dir, folds_csv):
    run = tmp_path / "run"
    proc = run_steel("launch", "--config", ROOT / "experiments/tiny.yaml", "--run-dir", run, "--data-dir", synth_dir,
                     "--folds-csv", folds_csv, "--executor", "slurm", "--dry-run", "--partition", "gpu", "--gpus-per-fold", "2",
                     "--time", "90", "--folds", "0-2", "--", "--trainer.max_epochs", "30")  # fmt: skip
    assert "dry run; array of 3 fold(s)" in proc.stdout
    sbatch = (run / "slurm" / "array.sbatch").read_text()
    assert "#SBATCH --array=0-2%3" in sbatch and "#SBATCH --partition=gpu" in sbatch
    assert (
        "#SBATCH --gpus-per-node=2" in sbatch
        and "#SBATCH --ntasks-per-node=2" in sbatch
        and "#SBATCH --time=90" in sbatch
    )
    cmds = (run / "slurm" / "commands.txt").read_text().splitlines()
    assert len(cmds) == 3
    for k, line in enumerate(cmds):
        assert (
            line.startswith(f"fold {k}: ")
            and f"--data.fold {k} " in line
            and f"--run_dir {run}/fold-{k}" in line
        )
        assert "--trainer.devices 2 --trainer.strategy ddp" in line and "--trainer.max_epochs 30" in line
    assert (run / "folds.csv").read_text() == Path(folds_csv).read_text()


def test_bad_launch_input_is_one_line(tmp_path, synth_dir, folds_csv):
    proc = run_steel("launch", "--config", tmp_path / "nope.yaml", check=False)
    assert proc.returncode == 2 and "nope.yaml: experiment config not found" in proc.stderr
    proc = run_steel("launch", "--config", ROOT / "experiments/tiny.yaml", "--data-dir", synth_dir, "--folds-csv", folds_csv,
                     "--run-dir", tmp_path / "r", "--folds", "0-5", check=False)  # fmt: skip
    assert proc.returncode == 2 and "fold 3 outside 0..2" in proc.stderr and "Traceback" not in proc.stderr


def _files(d: Path) -> dict[str, float]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


def test_launch_killed_then_resumed_covers_every_image_once(tmp_path, synth_dir, folds_csv):
    """Real launch of 3 folds on CPU; SIGKILL the launcher mid-run; run again: done folds untouched."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "steel.cli", "launch", "--config", str(ROOT / "experiments/tiny.yaml"), "--run-dir", str(run),
           "--data-dir", str(synth_dir), "--folds-csv", str(folds_csv), "--oof-stride", "1", "--", *FAST]  # fmt: skip
    env = dict(os.environ, WANDB_MODE="offline")
    first = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )
    deadline = time.time() + 400
    while time.time() < deadline and not (run / "fold-1" / "last.ckpt").is_file():
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.5)
    assert (run / "fold-0" / "done.json").is_file() and not (run / "fold-1" / "done.json").is_file()
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(2)  # the fold process dies with its parent (PR_SET_PDEATHSIG)
    fold0 = _files(run / "fold-0")
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "fold 0: already done" in second.stdout
    assert "fold 1: started on CPU (resuming from last.ckpt)" in second.stdout
    assert _files(run / "fold-0") == fold0  # untouched
    for k in range(3):
        assert (run / f"fold-{k}" / "best.ckpt").is_file() and (run / f"fold-{k}" / "done.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failed"] == [] and summary["cv_mean"] is not None and "CV best val/dice" in second.stdout
    store = OOFStore(run)
    split = pd.read_csv(folds_csv)
    assert sorted(store.ids) == sorted(split["ImageId"]) and len(set(store.ids)) == len(store.ids)
    assert np.array_equal(store.folds, split.set_index("ImageId").loc[store.ids, "fold"].to_numpy())
    assert store.masks.shape[-2:] == (64, 320) and store.truth.max() == 1
    assert np.isfinite(store.cls).all() and 0 <= store.cls.min() and store.cls.max() <= 1
