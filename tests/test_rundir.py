"""Run dirs: every fit leaves best/last/metrics.json, checkpoints record their fold and split, `steel oof` refuses
folds trained on another split, and a fold's val/dice is the dice of its rows of the OOF store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import yaml

from steel.cli import main as steel_main
from steel.errors import SteelError
from steel.folds import make_folds, split_hash, write_folds
from steel.labels import read_train
from steel.metrics import dice_per_pair
from steel.oof import OOFStore
from steel.postprocess import gating_params, postprocess
from steel.rundir import SPLIT_KEY, check_fold, check_run, fold_done, split_of, split_record
from tests._ensemble import save_checkpoint

pytest_plugins = ["tests.conftest_training"]


class LastCheckpointProbe(pl.Callback):
    """Test probe (``--trainer.callbacks``): at the start of every epoch after the first, records the epoch
    stored in <run_dir>/last.ckpt, i.e. whether the previous epoch left a resume point."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 0:
            return
        last = Path(trainer.default_root_dir) / "last.ckpt"
        epoch = torch.load(last, map_location="cpu", weights_only=False)["epoch"] if last.is_file() else None
        out = Path(trainer.default_root_dir) / "probe.json"
        seen = json.loads(out.read_text()) if out.is_file() else {}
        seen[str(trainer.current_epoch)] = epoch
        out.write_text(json.dumps(seen))


@pytest.fixture(scope="module")
def short_fit(synth_dir: Path, folds_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fold-0 dir of `steel fit` on tiny.yaml for 2 epochs of 2 batches; tiny validates every 3 epochs, so only
    the forced last-epoch validation happens. val_size 64x352 (native 64x320): validation resizes."""
    from tests.conftest_training import TINY, check, steel

    fold_dir = tmp_path_factory.mktemp("short") / "run" / "fold-0"
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
            fold_dir,
            "--trainer.max_epochs",
            2,
            "--trainer.limit_train_batches",
            2,
            "--data.val_size",
            "[64, 352]",
            "--trainer.logger",
            "false",
            "--trainer.callbacks+=tests.test_rundir.LastCheckpointProbe",
            timeout=900,
        )  # fmt: skip
    )
    return fold_dir


def _run_dir(root: Path, synth_dir: Path, folds: Path, fold0: Path) -> Path:
    """A 3-fold run dir on split ``folds``: fold-0 = the checkpoint ``fold0``, folds 1-2 random nets recorded
    as trained on that split."""
    run = root
    (run / "fold-0").mkdir(parents=True)
    shutil.copyfile(fold0, run / "fold-0" / "best.ckpt")
    for k in (1, 2):
        save_checkpoint(run / f"fold-{k}" / "best.ckpt", k, [64, 352], split_of(folds, k))
    shutil.copyfile(folds, run / "folds.csv")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"data_dir": str(synth_dir)}}))
    return run


def _other_split(synth_dir: Path, out: Path) -> Path:
    write_folds(make_folds(read_train(synth_dir), 3, seed=7), out)
    return out


def test_split_hash_is_content_only(tmp_path: Path, folds_csv: Path) -> None:
    df = pd.read_csv(folds_csv)
    shuffled = df.iloc[::-1][list(df.columns[::-1])]
    shuffled.to_csv(tmp_path / "crlf.csv", index=False, lineterminator="\r\n")
    h = split_hash(folds_csv)
    assert len(h) == 16 and split_hash(tmp_path / "crlf.csv") == h
    moved = df.copy()
    moved.loc[0, "fold"] = (moved.loc[0, "fold"] + 1) % 3
    moved.to_csv(tmp_path / "moved.csv", index=False)
    assert split_hash(tmp_path / "moved.csv") != h


def test_short_fit_leaves_best_last_and_metrics(short_fit: Path, folds_csv: Path) -> None:
    """max_epochs 2 < check_val_every_n_epoch 3: the last epoch is validated, best/last/metrics.json exist,
    and last.ckpt was written at the end of epoch 0 although epoch 0 was not validated."""
    assert fold_done(short_fit)
    metrics = json.loads((short_fit / "metrics.json").read_text())
    assert metrics["complete"] is True and metrics["fold"] == 0 and metrics["best_epoch"] == 1
    assert metrics["split_hash"] == split_hash(folds_csv) and metrics["best_val_dice"] is not None
    assert json.loads((short_fit / "probe.json").read_text()) == {"1": 0}
    last = torch.load(short_fit / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 1 and last[SPLIT_KEY] == split_of(folds_csv, 0)
    assert split_record(short_fit / "best.ckpt") == split_of(folds_csv, 0)
    check_fold(short_fit / "best.ckpt", 0, split_hash(folds_csv), short_fit.parent)


def test_fold_done_needs_all_three(tmp_path: Path) -> None:
    d = tmp_path / "fold-0"
    d.mkdir()
    (d / "best.ckpt").write_bytes(b"x")
    (d / "last.ckpt").write_bytes(b"x")
    assert not fold_done(d)
    (d / "metrics.json").write_text('{"fold": 0}')  # written by an older steel or by hand: not complete
    assert not fold_done(d)
    (d / "metrics.json").write_text('{"fold": 0, "complete": true}')
    assert fold_done(d)
    (d / "last.ckpt").unlink()
    assert not fold_done(d)


def test_val_dice_is_oof_dice_of_the_fold(
    short_fit: Path, synth_dir: Path, folds_csv: Path, tmp_path: Path
) -> None:
    """val/dice of best.ckpt (Lightning validation, resized 64x352 input) == the dice of `steel oof`'s rows of
    fold 0 under the same rule (hard gating, 0.5 / 0.5, through steel.postprocess)."""
    run = _run_dir(tmp_path / "run", synth_dir, folds_csv, short_fit / "best.ckpt")
    assert steel_main(["oof", str(run), "--stride", "1", "--device", "cpu", "--batch-size", "7"]) == 0
    st = OOFStore(run)
    rows = np.flatnonzero(st.folds == 0)
    rule = gating_params("hard", 0.5, 0.5)
    pred = np.stack([postprocess(st.masks[i], st.cls[i], rule) for i in rows])
    oof_dice = float(dice_per_pair(pred, st.truth[rows]).mean())
    val_dice = json.loads((short_fit / "metrics.json").read_text())["best_val_dice"]
    assert abs(oof_dice - val_dice) < 1e-6, (oof_dice, val_dice)
    assert 0.0 < val_dice < 1.0 and pred.any()


def test_oof_refuses_fold_trained_on_another_split(
    short_fit: Path, synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = _other_split(synth_dir, tmp_path / "other.csv")
    run = _run_dir(tmp_path / "run", synth_dir, other, short_fit / "best.ckpt")
    assert steel_main(["oof", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("steel oof: error: fold 0 of ")
    assert str(run / "fold-0" / "best.ckpt") in err and "another split" in err
    assert split_hash(other) in err and not (run / "oof").exists()


def test_check_fold_names_fold_and_missing_record(short_fit: Path, folds_csv: Path, tmp_path: Path) -> None:
    h = split_hash(folds_csv)
    with pytest.raises(SteelError, match=r"fold 1: .*best.ckpt was trained as fold 0"):
        check_fold(short_fit / "best.ckpt", 1, h)
    bare = save_checkpoint(tmp_path / "bare.ckpt", 0)
    with pytest.raises(SteelError, match="records no fold/split hash"):
        check_fold(bare, 0, h)
    run = tmp_path / "run"
    for k in range(3):  # fold 2 is fold 1's checkpoint copied by hand
        save_checkpoint(run / f"fold-{k}" / "best.ckpt", k, None, split_of(folds_csv, min(k, 1)))
    shutil.copyfile(folds_csv, run / "folds.csv")
    with pytest.raises(SteelError, match=r"fold 2 of .*was trained as fold 1"):
        check_run(run)


def test_resume_on_another_split_is_refused(short_fit: Path, synth_dir: Path, tmp_path: Path) -> None:
    from tests.conftest_training import TINY, steel

    other = _other_split(synth_dir, tmp_path / "other.csv")
    proc = steel(
        "fit", "--config", TINY, "--data.data_dir", synth_dir, "--data.folds_csv", other, "--data.fold", 0,
        "--run_dir", tmp_path / "fold-0", "--trainer.max_epochs", 3, "--trainer.limit_train_batches", 2,
        "--trainer.logger", "false", "--ckpt_path", short_fit / "last.ckpt", timeout=900,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("steel fit: error: --ckpt_path: the checkpoint was trained as fold 0 of split")
    assert split_hash(other) in last and "Traceback" not in proc.stderr
