"""Training-suite fixtures (pytest plugin; test files load it with ``pytest_plugins``).

Relies on the lead's ``synth_dir`` / ``folds_csv`` session fixtures (tests/conftest.py). ``tiny_run`` trains
experiments/tiny.yaml once per session through the real ``steel fit`` command (W&B offline) and is shared by
the module, experiment, W&B and DDP tests.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
TINY = EXPERIMENTS / "tiny.yaml"


def steel(
    *args: object, cwd: str | os.PathLike | None = None, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the real ``steel`` command line (``python -m steel.cli``) on CPU with W&B offline; text output."""
    full_env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "CUDA_VISIBLE_DEVICES": "",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "steel.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=timeout,
        env=full_env,
    )


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Raise with the process output if it failed."""
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(proc.args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def empty_baseline(data_dir: Path, folds_csv: Path, fold: int) -> float:
    """Competition dice of predicting nothing on a fold: mean over (image, class) of [truth empty]."""
    from steel.folds import split
    from steel.labels import read_train

    table = read_train(data_dir).set_index("ImageId")
    _, val_ids = split(folds_csv, fold)
    has = table.loc[val_ids, [f"has_{c}" for c in range(1, 5)]].to_numpy()
    return float((has == 0).mean())


def wandb_records(path: str | os.PathLike, block: int = 32768) -> Iterator[object]:
    """Protobuf ``Record`` messages of an offline W&B run file (run-<id>.wandb: LevelDB-style log, 32 KiB blocks,
    7-byte record headers crc32/length/type, type 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts + chunk if kind == 4 else chunk)
            parts = b""
            yield record
        elif kind in (2, 3):
            parts = (parts if kind == 3 else b"") + chunk


@pytest.fixture(scope="session")
def tiny_run(synth_dir: Path, folds_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run dir of ``steel fit --config experiments/tiny.yaml`` on the synthetic data, fold 0 (W&B offline)."""
    run_dir = tmp_path_factory.mktemp("tiny") / "fold-0"
    check(
        steel(
            "fit",
            "--config",
            TINY,
            "--data.data_dir",
            synth_dir,
            "--data.folds_csv",
            folds_csv,
            "--data.fold",
            0,
            "--run_dir",
            run_dir,
        )
    )
    return run_dir


@pytest.fixture(scope="session")
def tiny_baseline(synth_dir: Path, folds_csv: Path) -> float:
    return empty_baseline(synth_dir, folds_csv, 0)


@pytest.fixture
def seeded() -> None:
    import torch

    np.random.seed(0)
    torch.manual_seed(0)
