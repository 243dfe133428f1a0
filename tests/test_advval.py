"""steel advval: a test-set shift built into the synthetic data is detected, none is found without it."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from steel.advval import FEATURES, image_features, single_feature_auc
from steel.folds import load_folds
from tests.conftest import steel_in_process


def _synth(root: Path, shift: str) -> Path:
    out = root / f"data_{shift}"
    steel_in_process("synth", out, "--n-train", 150, "--n-test", 150, "--height", 64, "--width", 320,
                     "--seed", 5, "--shift", shift)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("advval")
    return {s: _synth(root, s) for s in ("none", "brightness", "texture")}


def test_shift_changes_test_images_only(data):
    """Same seed: train images identical, test images shifted (brightness: +24 grey levels, clipped)."""
    a, b = data["none"], data["brightness"]
    name = sorted(p.name for p in (a / "train_images").iterdir())[0]
    assert (a / "train_images" / name).read_bytes() == (b / "train_images" / name).read_bytes()
    assert (a / "train.csv").read_text() == (b / "train.csv").read_text()
    assert (a / "test_truth.csv").read_text() == (b / "test_truth.csv").read_text()
    test = sorted(p.name for p in (a / "test_images").iterdir())[0]
    x = cv2.imread(str(a / "test_images" / test), cv2.IMREAD_GRAYSCALE).astype(float)
    y = cv2.imread(str(b / "test_images" / test), cv2.IMREAD_GRAYSCALE).astype(float)
    assert 18 < (y - x).mean() < 26


@pytest.mark.parametrize("shift", ["brightness", "texture"])
def test_shift_is_detected_and_test_like_images_marked(data, tmp_path, shift):
    out = tmp_path / "av"
    proc = steel_in_process("advval", data[shift], "--out", out, "--mark", 0.2)
    summary = json.loads((out / "advval.json").read_text())
    assert summary["auc"] > (0.7 if shift == "brightness" else 0.9), summary
    assert summary["shift_detected"] and "train and test images differ" in proc.stdout
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == 300 and set(scores["split"]) == {"train", "test"}
    assert scores["test_likeness"].between(0, 1).all()
    assert (out / "advval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # fold 0 = the 30 train images with the highest test-likeness; a folds CSV `steel fit` can read
    folds = load_folds(out / "folds_advval.csv")
    train = scores[scores["split"] == "train"].set_index("ImageId")["test_likeness"]
    marked = folds.loc[folds["fold"] == 0, "ImageId"]
    assert len(marked) == 30 and len(folds) == 150
    assert train[marked].min() >= train.drop(marked).max()
    if shift == "brightness":  # the marked train images are the bright ones
        mean = {i: cv2.imread(str(data[shift] / "train_images" / i), 0).mean() for i in train.index}
        rest = [mean[i] for i in train.index if i not in set(marked)]
        assert np.mean([mean[i] for i in marked]) > np.mean(rest) + 5
        assert summary["top_features"][0]["feature"] in {"mean", *(f"p{q}" for q in (5, 25, 50, 75, 95))} | {
            f"hist_{i}" for i in range(16)
        }


def test_no_shift_no_detection(data, tmp_path):
    out = tmp_path / "av"
    proc = steel_in_process("advval", data["none"], "--out", out)
    summary = json.loads((out / "advval.json").read_text())
    assert 0.38 < summary["auc"] < 0.62, summary
    assert not summary["shift_detected"] and "no shift detected" in proc.stdout
    assert not (out / "folds_advval.csv").exists()


def test_single_feature_auc_by_hand():
    x = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [4.0, 5.0]])
    y = np.array([0, 0, 1, 1])
    np.testing.assert_allclose(single_feature_auc(x, y), [1.0, 0.5])
    img = np.full((64, 320), 100, np.uint8)
    f = dict(zip(FEATURES, image_features(img)))
    assert f["mean"] == 100 and f["std"] == 0 and f["hist_6"] == 1 and f["grad_x"] == 0


def test_bad_inputs_one_line(tmp_path, data):
    """Exit status 2 and the error on stderr (in this process: an uncaught exception would fail the test)."""
    proc = steel_in_process("advval", tmp_path / "d", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "train_images: image directory not found" in proc.stderr
    (tmp_path / "d" / "train_images").mkdir(parents=True)
    (tmp_path / "d" / "test_images").mkdir()
    proc = steel_in_process("advval", tmp_path / "d", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "train_images: 0 images, need at least 5" in proc.stderr
    proc = steel_in_process("advval", data["none"], "--out", tmp_path / "o", "--mark", 1.5, check=False)
    assert proc.returncode == 2 and "--mark 1.5" in proc.stderr and "Traceback" not in proc.stderr
