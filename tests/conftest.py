"""Shared fixtures: a small synthetic data set (64x320) and its folds, made once per session, and the two ways
to run the `steel` command line: in this process (``steel_in_process``, fast: for tests of what a command does)
and in a real subprocess (``run_steel``: for tests of its exit status, its stderr or a crash)."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# A test run started in the background by a non-interactive shell (`cmd &`, as some CI runners do) inherits
# SIGINT ignored, and so would every process the tests start: Ctrl-C tests would then test nothing. Handled
# signals are reset to the default in children at exec, ignored ones are not.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# One intra-op thread for torch here and in every subprocess (set before torch is imported): on 2 cores
# shared with other jobs, OpenMP's spinning threads made the tiny test nets ~10x slower, not faster.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Test files by wall-clock cost, longest first (idle 2-core box): collected in this order, so that pytest-xdist
# (`make test`: `--dist loadfile --no-loadscope-reorder`) starts the long ones first and the short ones fill in
# at the end, instead of a long file starting last. The rest keep their order after these.
LONGEST_FIRST = (
    "test_slurm.py", "test_export.py", "test_pseudo.py", "test_lifecycle.py", "test_launch.py", "test_gpu_check.py",
    "test_predict.py", "test_stages.py", "test_rundir.py", "test_experiments.py", "test_ddp.py", "test_sweep.py",
)  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable sort


SYNTH_SHAPE = (64, 320)
# Subprocess time limit: a guard against a hung process, never a speed requirement (the commands the tests
# run take seconds; 15 minutes is far beyond 10x that even on a machine 3x slower than a loaded 2-core box).
HANG_GUARD_S = 900


def run_steel(
    *args: object,
    check: bool = True,
    cwd: str | os.PathLike | None = None,
    timeout: float = HANG_GUARD_S,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run the real `steel` command line in a subprocess; returns the completed process (text output)."""
    proc = subprocess.run(
        [sys.executable, "-m", "steel.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, **env} if env else None,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"steel {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def steel_in_process(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    """``steel.cli.main`` in this process with stdout/stderr captured; the result looks like ``run_steel``'s.
    Seconds faster a call than a subprocess (no interpreter start, torch/Lightning already imported)."""
    from steel.cli import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    # the CLI collects garbage after an error; the test process's own heap (torch, Lightning, fixtures) is
    # frozen meanwhile so that this does not walk it (~0.4 s a call); the command's garbage is still collected
    gc.freeze()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse --help / usage errors, LightningCLI --print_config
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            gc.unfreeze()
    proc = subprocess.CompletedProcess(["steel", *argv], rc, out.getvalue(), err.getvalue())
    if check and rc != 0:
        raise AssertionError(
            f"steel {' '.join(argv)} exited {rc}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def make_synth(out: Path, n_train: int, n_test: int, seed: int, shape: tuple[int, int]) -> Path:
    """``steel synth`` into ``out`` (in this process)."""
    steel_in_process(
        "synth",
        out,
        "--n-train",
        n_train,
        "--n-test",
        n_test,
        "--seed",
        seed,
        "--height",
        shape[0],
        "--width",
        shape[1],
    )
    return out


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic Kaggle-layout data: 60 train + 20 test images of 64x320."""
    return make_synth(tmp_path_factory.mktemp("synth") / "data", 60, 20, 3, SYNTH_SHAPE)


@pytest.fixture(scope="session")
def folds_csv(synth_dir: Path) -> Path:
    """3 stratified folds of ``synth_dir``."""
    out = synth_dir.parent / "folds.csv"
    steel_in_process("folds", synth_dir, "--n-folds", 3, "--seed", 42, "--out", out)
    return out
