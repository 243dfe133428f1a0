"""steel inspect: class activation maps of the label head (exact for avg pooling, located on a trained fold) and
the OOF error gallery (the worst cases it pictures are the worst by brute force), PNGs + W&B offline runs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from steel.inspection import KINDS, class_activation_maps, default_images, head_maps, oof_errors, worst
from steel.labels import masks_of, read_train
from steel.metrics import dice_per_pair
from steel.module import load_model
from steel.oof import OOFStore
from steel.postprocess import Params, postprocess
from tests._ensemble import make_run, save_checkpoint
from tests.conftest import steel_in_process
from tests.conftest_training import wandb_records

pytest_plugins = ["tests.conftest_training"]
PNG = b"\x89PNG\r\n\x1a\n"


def _images(data: Path, ids: list[str]) -> torch.Tensor:
    grey = [cv2.imread(str(data / "train_images" / i), cv2.IMREAD_GRAYSCALE) for i in ids]
    return torch.from_numpy(np.stack(grey)).float().div(255).unsqueeze(1)


def _logged_images(out: Path) -> list[str]:
    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run in {out}"
    keys = []
    for rec in wandb_records(files[-1], finished=True):
        if rec.WhichOneof("record_type") == "history":
            keys += [item.key or item.nested_key[0] for item in rec.history.item]
    return sorted(set(keys))


@pytest.mark.parametrize("input_size", [None, [64, 352]])
def test_head_maps_decompose_the_label_logit(synth_dir, tmp_path, input_size):
    """Avg pooling: mean over positions of W_c . F plus the bias is the class logit; maps come back at native size."""
    ck = save_checkpoint(tmp_path / "avg.ckpt", seed=3, input_size=input_size, pooling="avg")
    model = load_model(ck)
    ids = read_train(synth_dir)["ImageId"].tolist()[:3]
    x = _images(synth_dir, ids)
    xin = x if input_size is None else torch.nn.functional.interpolate(x, size=input_size, mode="bilinear")
    maps, logits = head_maps(model.net, xin)
    bias = model.net.net.classification_head[-2].bias.detach()
    torch.testing.assert_close(maps.mean((-2, -1)) + bias, logits, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(logits, model.net(xin)["label"])
    native, probs = class_activation_maps(model, x)
    assert native.shape == (3, 4, 64, 320) and not native.requires_grad
    torch.testing.assert_close(probs, torch.sigmoid(logits))


def test_cam_of_a_trained_fold_sits_on_its_defects(learned_run, small_synth, tmp_path):
    """The learning fold's class-3 map is higher inside the true class-3 masks than outside on most images."""
    data, _ = small_synth
    table = read_train(data).set_index("ImageId")
    ids = table.index[table["has_3"] > 0][:10].tolist()
    maps, probs = class_activation_maps(load_model(learned_run / "best.ckpt"), _images(data, ids))
    truth = np.stack([masks_of(table.loc[i], maps.shape[-2:])[2] for i in ids]).astype(bool)
    m = maps[:, 2].numpy()
    inside = np.array([m[j][truth[j]].mean() > m[j][~truth[j]].mean() for j in range(len(ids))])
    assert inside.mean() >= 0.7, inside

    # the command: default images (one per class present + a defect-free one), PNG each, logged to W&B
    out = tmp_path / "cam"
    proc = steel_in_process("inspect", "cam", learned_run, "--out", out)
    picked = default_images(table)
    assert "inspect cam: " in proc.stdout and len(picked) >= 3
    for name in picked:
        assert (out / f"cam_{Path(name).stem}.png").read_bytes()[:8] == PNG
    assert sum(k.startswith("cam/") for k in _logged_images(out)) == len(picked)
    # explicit image files, no labels, no W&B
    out2 = tmp_path / "cam2"
    steel_in_process("inspect", "cam", learned_run / "best.ckpt", "--images", data / "test_images" / sorted(
        p.name for p in (data / "test_images").iterdir())[0], "--out", out2, "--no-wandb")  # fmt: skip
    assert len(list(out2.glob("cam_*.png"))) == 1 and not (out2 / "wandb").exists()


@pytest.fixture(scope="module")
def run_with_oof(tmp_path_factory, synth_dir, folds_csv) -> Path:
    """A 3-fold run of random tiny nets with its OOF store and thresholds: plenty of errors of every kind."""
    return make_run(tmp_path_factory.mktemp("gallery"), "r", synth_dir, folds_csv, seed=7)


def test_gallery_pictures_the_worst_errors(run_with_oof, synth_dir, tmp_path):
    errors = oof_errors(run_with_oof)
    store, params = OOFStore(run_with_oof), Params.load(run_with_oof)
    # brute force: the tuned rule on every OOF row, scored per (image, class)
    pred = np.stack(
        [postprocess(store.masks[i], store.cls[i], params, store.stride) for i in range(len(store))]
    )
    dice = dice_per_pair(pred, np.asarray(store.truth))
    np.testing.assert_allclose(errors["dice"].to_numpy().reshape(-1, 4), dice)
    picked = worst(errors, k=2)
    for c in range(1, 5):
        e = errors[errors["class"] == c]
        fp = e[(e["true_area"] == 0) & (e["pred_area"] > 0)]
        got = picked[(picked["class"] == c) & (picked["kind"] == KINDS[0])]
        assert len(got) == min(2, len(fp))
        if len(fp):
            assert got["pred_area"].iloc[0] == fp["pred_area"].max()
        both = e[(e["true_area"] > 0) & (e["pred_area"] > 0)]
        got = picked[(picked["class"] == c) & (picked["kind"] == KINDS[2])]
        if len(both):
            assert got["dice"].iloc[0] == both["dice"].min()
    assert set(picked["kind"]) <= set(KINDS) and len(picked) > 0

    out = tmp_path / "gallery"
    proc = steel_in_process("inspect", "gallery", run_with_oof, "--out", out, "--k", 2)
    assert "inspect gallery: " in proc.stdout
    for c in range(1, 5):
        assert (out / f"gallery_class{c}.png").read_bytes()[:8] == PNG
    csv = pd.read_csv(out / "gallery.csv")
    assert len(csv) == len(picked) and set(csv["ImageId"]) <= set(store.ids)
    keys = _logged_images(out)
    assert {f"gallery/class_{c}" for c in range(1, 5)} <= set(keys) and "gallery/worst" in keys


def test_inspect_bad_inputs_one_line(tmp_path, synth_dir):
    """Exit status 2 and one error line (in this process: an uncaught exception would fail the test)."""
    cases = [
        (["cam", tmp_path / "nope.ckpt", "--out", tmp_path / "o"], "nope.ckpt: not found"),
        (["gallery", tmp_path, "--out", tmp_path / "o"], "no OOF store"),
    ]
    for args, match in cases:
        proc = steel_in_process("inspect", *args, check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith("steel inspect: error: ") and match in last, (
            args,
            last,
        )
