"""Training-suite fixtures (pytest plugin; test files load it with ``pytest_plugins``).

Relies on the ``synth_dir`` / ``folds_csv`` session fixtures (tests/conftest.py). Two session runs, both
``steel fit`` in this process (no interpreter start, nothing here tests an exit status):
  ``tiny_run``     experiments/tiny.yaml cut to the fewest steps that prove the plumbing (2 epochs of 2 batches,
                   each epoch validated, W&B offline): run-dir files, checkpoints, W&B records, DDP validation.
  ``learned_run``  the one learning run: tiny.yaml on 32x160 synthetic images, whole images, 150 steps; its
                   val/dice must beat predicting nothing (it does by 0.04-0.06 on seeds 0-4 and 42).
"""

from __future__ import annotations

import os
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from tests.conftest import HANG_GUARD_S, make_synth, run_steel, steel_in_process

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
TINY = EXPERIMENTS / "tiny.yaml"
# the plumbing run: 2 epochs x 2 batches of 4 crops, validated after each epoch, every step logged
TINY_PLUMBING = ("--trainer.max_epochs", 2, "--trainer.limit_train_batches", 2, "--trainer.check_val_every_n_epoch", 1,
                 "--trainer.log_every_n_steps", 1)  # fmt: skip
# the learning run: 32x160 images, no crop, batches of 8, 30 epochs x 5 steps, validated every 3 epochs
LEARN_SHAPE = (32, 160)
TINY_LEARNING = ("--trainer.max_epochs", 30, "--trainer.check_val_every_n_epoch", 3, "--data.train_crop", "null",
                 "--data.batch_size", 8, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false")  # fmt: skip


def steel(
    *args: object,
    cwd: str | os.PathLike | None = None,
    timeout: float = HANG_GUARD_S,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run the real ``steel`` command line in a subprocess (CPU, W&B offline); text output, not checked."""
    base = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "CUDA_VISIBLE_DEVICES": ""}
    return run_steel(*args, check=False, cwd=cwd or REPO, timeout=timeout, env={**base, **(env or {})})


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Raise with the process output if it failed."""
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, proc.args))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def fit(config: Path, data_dir: Path, folds: Path, run_dir: Path, *extra: object) -> Path:
    """``steel fit --config CONFIG`` on fold 0 of ``data_dir`` in this process; returns the run dir."""
    steel_in_process("fit", "--config", config, "--data.data_dir", data_dir, "--data.folds_csv", folds,
                     "--data.fold", 0, "--run_dir", run_dir, *extra)  # fmt: skip
    return run_dir


def empty_baseline(data_dir: Path, folds_csv: Path, fold: int) -> float:
    """Competition dice of predicting nothing on a fold: mean over (image, class) of [truth empty]."""
    from steel.folds import split
    from steel.labels import read_train

    table = read_train(data_dir).set_index("ImageId")
    _, val_ids = split(folds_csv, fold)
    has = table.loc[val_ids, [f"has_{c}" for c in range(1, 5)]].to_numpy()
    return float((has == 0).mean())


def _parse_wandb(data: bytes, block: int = 32768) -> list:
    """Protobuf ``Record`` messages of the complete records in ``data`` (LevelDB-style log, 32 KiB blocks,
    7-byte record headers crc32/length/type, type 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    pos, parts, records = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # being written
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts + chunk if kind == 4 else chunk)
            parts = b""
            records.append(record)
        elif kind in (2, 3):
            parts = (parts if kind == 3 else b"") + chunk
    return records


def wandb_records(path: str | os.PathLike, finished: bool = False) -> Iterator[object]:
    """Protobuf ``Record`` messages of an offline W&B run file (run-<id>.wandb). ``finished``: the run has ended
    in this process; wait (hang guard ``HANG_GUARD_S``) for its ``exit`` record, as W&B's service writes the file
    after ``finish()`` returns (on a busy box a test read a finished run's file before its history records). A
    run of a process that was killed has no exit record: read it as it is."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        data = Path(path).read_bytes()
        assert data[:4] == b":W&B", f"{path}: not a W&B run file"
        records = _parse_wandb(data)
        if not finished or (records and records[-1].WhichOneof("record_type") == "exit"):
            return iter(records)
        assert time.monotonic() < deadline, f"{path}: no exit record after {HANG_GUARD_S} s"
        time.sleep(0.1)


class Probe(pl.Callback):
    """A callback (``--trainer.callbacks+=tests.conftest_training.Probe``) that records what a fit really ran
    into ``Probe.seen`` (LightningCLI builds the instance): optimiser, schedulers, sampler, augmentations, batch
    shapes and dtypes, losses, learning rates, logged metrics and how many weight tensors moved."""

    seen: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        Probe.seen = {
            "optimizer": type(trainer.optimizers[0]).__name__,
            "schedulers": [type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs],
            "sampler": type(trainer.train_dataloader.sampler).__name__,
            "augs": [type(t).__name__ for t in trainer.datamodule.train_transform.augs.transforms],
            "weights": {
                k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()
            },
            "batches": [],
            "lrs": [],
        }

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: dict,
                           batch_idx: int) -> None:  # fmt: skip
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        image, mask = batch["image"], batch["mask"]
        Probe.seen["batches"].append((tuple(image.shape), image.dtype, tuple(mask.shape), float(loss)))
        Probe.seen["lrs"].append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        before, after = Probe.seen.pop("weights"), module.state_dict()
        Probe.seen["moved"] = sum(not bool(torch.equal(after[k], v)) for k, v in before.items())
        Probe.seen["metrics"] = sorted(trainer.callback_metrics)


@pytest.fixture(scope="session")
def tiny_run(synth_dir: Path, folds_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run dir of the plumbing fit (tiny.yaml, 2 epochs x 2 batches, W&B offline) on the synthetic data, fold 0."""
    return fit(TINY, synth_dir, folds_csv, tmp_path_factory.mktemp("tiny") / "fold-0", *TINY_PLUMBING)


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data dir, folds csv): 60 train + 4 test synthetic images of 32x160, 3 folds."""
    data = make_synth(tmp_path_factory.mktemp("small") / "data", 60, 4, 3, LEARN_SHAPE)
    folds = data.parent / "folds.csv"
    steel_in_process("folds", data, "--n-folds", 3, "--seed", 42, "--out", folds)
    return data, folds


@pytest.fixture(scope="session")
def learned_run(small_synth: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run dir of the learning fit (module docstring)."""
    data, folds = small_synth
    return fit(TINY, data, folds, tmp_path_factory.mktemp("learn") / "fold-0", *TINY_LEARNING)


@pytest.fixture(scope="session")
def learned_baseline(small_synth: tuple[Path, Path]) -> float:
    return empty_baseline(*small_synth, 0)


@pytest.fixture
def seeded() -> None:
    np.random.seed(0)
    torch.manual_seed(0)
