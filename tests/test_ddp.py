"""``steel validate`` on one checkpoint: 2-process DDP (gloo, CPU) gives the same val/dice as one process, and
both equal the best val/dice recorded during fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest_training import TINY, check, steel

pytest_plugins = ["tests.conftest_training"]


def _validate(tiny_run: Path, synth_dir: Path, folds_csv: Path, out: Path, *extra: object) -> dict:
    check(
        steel(
            "validate",
            "--config",
            TINY,
            "--data.data_dir",
            synth_dir,
            "--data.folds_csv",
            folds_csv,
            "--data.fold",
            0,
            "--ckpt_path",
            tiny_run / "best.ckpt",
            "--run_dir",
            out,
            "--trainer.logger",
            "false",
            *extra,
        )
    )
    return json.loads((out / "validate.json").read_text())


def test_validate_single_process_matches_fit(
    tiny_run: Path, synth_dir: Path, folds_csv: Path, tmp_path: Path
) -> None:
    single = _validate(tiny_run, synth_dir, folds_csv, tmp_path / "single")
    best = json.loads((tiny_run / "metrics.json").read_text())
    assert single["val/dice"] == pytest.approx(best["best_val_dice"], abs=1e-6)
    assert [single[f"val/dice_{c}"] for c in range(1, 5)] == pytest.approx(
        best["val_dice_per_class"], abs=1e-6
    )


@pytest.mark.slow
def test_ddp_validate_equals_single(tiny_run: Path, synth_dir: Path, folds_csv: Path, tmp_path: Path) -> None:
    single = _validate(tiny_run, synth_dir, folds_csv, tmp_path / "single")
    # 20 validation images over 2 ranks with batch 8: uneven batches, no padding/duplicates allowed
    ddp = _validate(
        tiny_run,
        synth_dir,
        folds_csv,
        tmp_path / "ddp",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        2,
        "--trainer.strategy",
        "ddp",
    )
    for key in ["val/dice"] + [f"val/dice_{c}" for c in range(1, 5)]:
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key
