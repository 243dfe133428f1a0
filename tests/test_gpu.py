"""CUDA paths, run only where a GPU is (``pytest -m gpu``; benchmarks/gpu_check.sh runs them on a lent GPU):
a tiny fit with bf16-mixed and 16-mixed, ``steel launch --gpus 0`` with 2 folds queued on one GPU, and
``steel export`` + ``steel predict --device cuda`` with parity against CPU.

Everything goes through the real ``steel`` command line in subprocesses that see the GPU (tests/conftest.py hides
it from the rest of the suite). Each run is small (64x320 synthetic images, a few steps), so the whole file takes
about a minute on an H100 once the CUDA context is up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from steel import rle
from steel.labels import read_submission

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny.yaml"
EXPORT_NAME = "ensemble.pt2"  # steel export picks the format from the suffix
HANG_GUARD_S = 1800  # a hang guard only: each command takes seconds on a GPU


def _gpu_env() -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env["CUDA_VISIBLE_DEVICES"] = os.environ.get("STEEL_TEST_GPUS", "0")
    return env


def steel_gpu(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``steel ARGS`` in a subprocess that sees the GPU; raise with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", "steel.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=HANG_GUARD_S,
        env=_gpu_env(),
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"steel {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def _probe_cuda() -> str | None:
    """Why CUDA cannot be used in a child that sees STEEL_TEST_GPUS, or None when it can."""
    code = "import torch; print(torch.cuda.is_available() and torch.cuda.device_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_gpu_env())
    return None if out.stdout.strip() not in ("", "False", "0") else "no CUDA device visible"


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda() -> None:
    reason = _probe_cuda()
    if reason:
        pytest.skip(reason)


# fewest steps that still run every part of a fit: 3 epochs (tiny validates every 3rd), 4 batches each
FIT_ARGS = ("--trainer.max_epochs", 3, "--trainer.limit_train_batches", 4, "--trainer.logger", "false")


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_tiny_fit_on_cuda_with_amp(precision, synth_dir, folds_csv, tmp_path):
    run = tmp_path / f"fit-{precision}"
    steel_gpu("fit", "--config", TINY, "--data.data_dir", synth_dir, "--data.folds_csv", folds_csv,
              "--data.fold", 0, "--trainer.accelerator", "gpu", "--trainer.devices", 1,
              "--trainer.precision", precision, "--run_dir", run, *FIT_ARGS)  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    assert (run / "best.ckpt").is_file() and (run / "last.ckpt").is_file()
    assert metrics["best_val_dice"] is not None and 0.0 <= metrics["best_val_dice"] <= 1.0
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)
    weights = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
    assert all(bool(torch.isfinite(w).all()) for w in weights)  # AMP did not blow the weights up
    if precision == "16-mixed":  # the fp16 grad scaler ran and its state was saved for resume
        assert "scale" in (ckpt.get("MixedPrecision") or {}), sorted(ckpt)


@pytest.fixture(scope="module")
def gpu_run(synth_dir, tmp_path_factory) -> Path:
    """``steel launch --gpus 0`` of a 2-fold split: both folds queue on the one GPU, then the OOF store is built
    on the GPU and thresholds are tuned (``steel sweep``)."""
    root = tmp_path_factory.mktemp("gpu-launch")
    folds2, run = root / "folds2.csv", root / "run"
    steel_gpu("folds", synth_dir, "--n-folds", 2, "--seed", 1, "--out", folds2)
    proc = steel_gpu("launch", "--config", TINY, "--folds", "0-1", "--gpus", "0", "--gpus-per-fold", 1,
                     "--data-dir", synth_dir, "--folds-csv", folds2, "--run-dir", run,
                     "--", *FIT_ARGS, "--trainer.precision", "bf16-mixed")  # fmt: skip
    print(proc.stdout[-2000:])
    steel_gpu("sweep", run)  # the exact search
    return run


def test_launch_two_folds_on_one_gpu(gpu_run):
    for k in (0, 1):
        fold = gpu_run / f"fold-{k}"
        assert (fold / "best.ckpt").is_file() and (fold / "metrics.json").is_file(), k
        assert "accelerator: gpu" in (fold / "config.yaml").read_text()
    summary = json.loads((gpu_run / "summary.json").read_text())
    assert len(summary["folds"]) == 2
    assert (gpu_run / "oof").is_dir() and (gpu_run / "thresholds.json").is_file()


def test_export_and_predict_on_cuda_match_cpu(gpu_run, synth_dir, tmp_path):
    """The run, exported as one file, predicts the same masks on CUDA as on CPU."""
    exported = tmp_path / EXPORT_NAME
    steel_gpu("export", gpu_run, "--out", exported)
    images = synth_dir / "test_images"
    subs = {}
    for device in ("cpu", "cuda"):
        subs[device] = tmp_path / f"sub-{device}.csv"
        steel_gpu("predict", exported, "--images", images, "--out", subs[device], "--device", device)
    cpu, gpu = (read_submission(subs[d]).set_index(["ImageId", "ClassId"])["EncodedPixels"] for d in subs)
    assert len(cpu) == len(gpu) > 0
    # the same masks, up to rare boundary pixels whose probability sits on a threshold (TF32/cuDNN vs CPU sums)
    diff = total = 0
    for key, a in cpu.items():
        ma, mb = rle.decode(a, (64, 320)), rle.decode(gpu[key], (64, 320))
        diff += int(np.count_nonzero(ma != mb))
        total += ma.size
    assert diff / total < 1e-4, f"{diff} of {total} mask pixels differ between CPU and CUDA"
