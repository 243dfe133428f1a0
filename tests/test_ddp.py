"""``steel validate`` on one checkpoint: 2-process DDP (gloo, CPU) gives the same val/dice as one process, and
both equal the val/dice recorded during fit for that checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import steel_in_process
from tests.conftest_training import TINY, check, steel

pytest_plugins = ["tests.conftest_training"]

KEYS = ["val/dice"] + [f"val/dice_{c}" for c in range(1, 5)]


def _args(tiny_run: Path, synth_dir: Path, folds_csv: Path, out: Path) -> list[object]:
    return ["validate", "--config", TINY, "--data.data_dir", synth_dir, "--data.folds_csv", folds_csv,
            "--data.fold", 0, "--ckpt_path", tiny_run / "best.ckpt", "--run_dir", out, "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false"]  # fmt: skip


@pytest.fixture(scope="module")
def single(
    tiny_run: Path, synth_dir: Path, folds_csv: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """validate.json of one process (in this process)."""
    out = tmp_path_factory.mktemp("validate") / "single"
    steel_in_process(*_args(tiny_run, synth_dir, folds_csv, out))
    return json.loads((out / "validate.json").read_text())


def test_validate_single_process_matches_fit(single: dict, tiny_run: Path) -> None:
    best = json.loads((tiny_run / "metrics.json").read_text())
    assert single["val/dice"] == pytest.approx(best["best_val_dice"], abs=1e-6)
    assert [single[f"val/dice_{c}"] for c in range(1, 5)] == pytest.approx(
        best["val_dice_per_class"], abs=1e-6
    )


def test_ddp_validate_equals_single(
    single: dict, tiny_run: Path, synth_dir: Path, folds_csv: Path, tmp_path: Path
) -> None:
    """Two real processes (the launcher starts the second): 20 validation images over 2 ranks with batch 10,
    uneven per rank, no padding or duplicates allowed."""
    out = tmp_path / "ddp"
    ddp_args = ("--trainer.accelerator", "cpu", "--trainer.devices", 2, "--trainer.strategy", "ddp")
    check(steel(*_args(tiny_run, synth_dir, folds_csv, out), *ddp_args))
    ddp = json.loads((out / "validate.json").read_text())
    for key in KEYS:
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key
