"""Shared fixtures: a small synthetic data set (64x320) and its folds, made once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

SYNTH_SHAPE = (64, 320)


def run_steel(
    *args: str, check: bool = True, cwd: str | os.PathLike | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run the real `steel` command line in a subprocess; returns the completed process (text output)."""
    proc = subprocess.run(
        [sys.executable, "-m", "steel.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"steel {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic Kaggle-layout data: 60 train + 20 test images of 64x320."""
    out = tmp_path_factory.mktemp("synth") / "data"
    run_steel(
        "synth",
        out,
        "--n-train",
        60,
        "--n-test",
        20,
        "--seed",
        3,
        "--height",
        SYNTH_SHAPE[0],
        "--width",
        SYNTH_SHAPE[1],
    )
    return out


@pytest.fixture(scope="session")
def folds_csv(synth_dir: Path) -> Path:
    """3 stratified folds of ``synth_dir``."""
    out = synth_dir.parent / "folds.csv"
    run_steel("folds", synth_dir, "--n-folds", 3, "--seed", 42, "--out", out)
    return out
