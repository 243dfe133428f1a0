"""steel pseudo: the keep rule by hand, the PSEUDO_DIR it writes from a trained fold (kept labels beat the
source's predictions on all test images), and data.pseudo_dir mixing pseudo images into training only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from steel.data import SteelDataModule
from steel.errors import SteelError
from steel.labels import image_shape, read_submission, read_train, write_submission
from steel.metrics import score_submission
from steel.postprocess import Params
from steel.pseudo import PseudoMixSampler, decide, parse_per_class
from tests.conftest import run_steel, steel_in_process
from tests.conftest_training import check, steel

pytest_plugins = ["tests.conftest_training"]

HI, LO, NONE = np.full(4, 0.95), np.full(4, 0.05), np.zeros(4)


# ---- the rule ----------------------------------------------------------------------------------------------
def test_decide_by_hand():
    cls = np.array(
        [
            [0.99, 0.01, 0.02, 0.01],  # class 1 confident, mask + head agree -> kept with class 1
            [0.01, 0.01, 0.01, 0.01],  # all confident negatives, nothing drawn -> kept defect-free
            [0.50, 0.01, 0.01, 0.01],  # class 1 unsure -> dropped
            [0.99, 0.01, 0.01, 0.01],  # classifier sure, post-processed mask empty -> dropped
            [0.01, 0.01, 0.01, 0.03],  # class 4 negative but the mask head draws 3 px -> dropped
            [0.96, 0.01, 0.01, 0.01],  # head area 4 < seg_min_area 5 of class 1 -> dropped
        ]
    )
    mask = np.array([[40, 0, 0, 0], [0] * 4, [40, 0, 0, 0], [0] * 4, [0] * 4, [4, 0, 0, 0]])
    head = np.array([[50, 0, 0, 0], [0] * 4, [50, 0, 0, 0], [9, 0, 0, 0], [0, 0, 0, 3], [4, 0, 0, 0]])
    kept, pos, why = decide(cls, mask, head, HI, LO, np.array([5.0, 0, 0, 0]))
    assert kept.tolist() == [True, True, False, False, False, False]
    assert pos[0].tolist() == [True, False, False, False] and not pos[1].any()
    assert why[0] == "kept: defects 1" and why[1] == "kept: defect-free"
    assert why[2] == "class 1: classifier 0.500 between the cut-offs 0.05 and 0.95"
    assert why[3] == "class 1: classifier 0.990 > 0.95 but mask 0 px, mask head 9 px"
    assert why[4] == "class 4: classifier 0.030 < 0.05 but mask 0 px, mask head 3 px"
    assert why[5].startswith("class 1: classifier 0.960 > 0.95 but mask 4 px, mask head 4 px")
    # per-class cut-offs: class 1 accepted as present from 0.4 on
    kept, _, _ = decide(cls, mask, head, np.array([0.4, 0.95, 0.95, 0.95]), LO, NONE)
    assert kept.tolist() == [True, True, True, False, False, True]


def test_parse_per_class():
    assert parse_per_class("0.9", "hi", 0.95).tolist() == [0.9] * 4
    assert parse_per_class("0.9,0.8,0.7,0.6", "hi", 0.95).tolist() == [0.9, 0.8, 0.7, 0.6]
    assert parse_per_class(None, "lo", 0.05).tolist() == [0.05] * 4
    for bad in ("0.9,0.8", "x", "nan"):
        with pytest.raises(SteelError, match="--hi"):
            parse_per_class(bad, "hi", 0.95)


def test_mix_sampler_share_and_order():
    base = list(np.random.default_rng(0).permutation(30))

    class Base:
        def __iter__(self):
            return iter(base)

        def __len__(self):
            return 30

    s = PseudoMixSampler(Base(), 30, 4, 0.25, seed=1)
    order = list(s)
    assert len(order) == len(s) == 40  # 10 pseudo = 0.25 of 40
    extra = [i for i in order if i >= 30]
    assert [i for i in order if i < 30] == base  # the fold's own order (e.g. balanced) is kept
    assert sorted(extra[:4]) == [30, 31, 32, 33] and sorted(extra[4:8]) == [30, 31, 32, 33]
    assert list(s) != order  # a new draw next epoch
    assert len(PseudoMixSampler(None, 30, 0, 0.25)) == 30


# ---- training side ------------------------------------------------------------------------------------------
def _hand_pseudo_dir(synth_dir: Path, out: Path, n: int = 8) -> Path:
    """A PSEUDO_DIR layout with the true labels of the first n synthetic test images."""
    names = sorted(p.name for p in (synth_dir / "test_images").iterdir())[:n]
    (out / "train_images").mkdir(parents=True)
    for name in names:
        shutil.copyfile(synth_dir / "test_images" / name, out / "train_images" / name)
    truth = pd.read_csv(synth_dir / "test_truth.csv")
    truth[truth["ImageId"].isin(names)].to_csv(out / "train.csv", index=False)
    return out


def _dm(synth_dir: Path, folds_csv: Path, **kw) -> SteelDataModule:
    args = {"batch_size": 4, "num_workers": 0, "pin_memory": False, "augment": "none", **kw}
    dm = SteelDataModule(str(synth_dir), str(folds_csv), 0, **args)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("sampler", ["random", "balanced"])
def test_datamodule_adds_pseudo_images_to_training_only(synth_dir, folds_csv, tmp_path, sampler):
    pdir = _hand_pseudo_dir(synth_dir, tmp_path / "pseudo")
    dm = _dm(synth_dir, folds_csv, pseudo_dir=str(pdir), pseudo_share=0.25, sampler=sampler)
    n = len(dm.train_set)
    k = round(0.25 / 0.75 * n)
    pseudo_ids = set(read_train(pdir)["ImageId"])
    truth = read_train(pdir).set_index("ImageId")
    seen, batches = [], 0
    for batch in dm.train_dataloader():
        batch = dm.on_after_batch_transfer(batch, 0)  # as on the device: float images, 0/1 masks, labels
        batches += 1
        seen += list(batch["image_id"])
        for i, image_id in enumerate(batch["image_id"]):
            if image_id in pseudo_ids:  # labels are the pseudo labels (no augmentation here)
                assert (
                    batch["label"][i].tolist()
                    == truth.loc[image_id, [f"has_{c}" for c in range(1, 5)]].tolist()
                )
    assert len(seen) == (n + k) // 4 * 4  # drop_last
    assert sum(i in pseudo_ids for i in seen) >= k - 3 and pseudo_ids <= set(seen)
    assert set(seen) - pseudo_ids <= set(dm.train_table["ImageId"])
    val = [i for b in dm.val_dataloader() for i in b["image_id"]]
    assert sorted(val) == sorted(dm.val_table["ImageId"]) and not pseudo_ids & set(val)


def test_datamodule_pseudo_errors(synth_dir, folds_csv, tmp_path):
    pdir = _hand_pseudo_dir(synth_dir, tmp_path / "pseudo")
    with pytest.raises(SteelError, match="pseudo_share 1.0"):
        _dm(synth_dir, folds_csv, pseudo_dir=str(pdir), pseudo_share=1.0).train_dataloader()
    with pytest.raises(SteelError, match="no train.csv"):
        _dm(synth_dir, folds_csv, pseudo_dir=str(tmp_path / "nothing")).train_dataloader()
    # a training image among the pseudo images: refused, named
    name = sorted(p.name for p in (synth_dir / "train_images").iterdir())[0]
    shutil.copyfile(synth_dir / "train_images" / name, pdir / "train_images" / name)
    with pytest.raises(SteelError, match=f"{name}: also an image of the training data"):
        _dm(synth_dir, folds_csv, pseudo_dir=str(pdir)).train_dataloader()


# ---- steel pseudo on a trained fold ---------------------------------------------------------------------------
def _ensemble(run: Path, shape: list[int], ens: Path) -> Path:
    """``ens``: an ensemble dir of the fold ``run``'s best.ckpt (no TTA, default thresholds) for images ``shape``."""
    ens.mkdir(parents=True)
    spec = {"members": [{"run_dir": str(run), "checkpoints": [str(run / "best.ckpt")], "tta": ["none"],
                         "weight": 1.0}], "mode": "mean", "image_size": shape}  # fmt: skip
    (ens / "ensemble.yaml").write_text(yaml.safe_dump(spec))
    Params.uniform().save(ens / "thresholds.json")
    return ens


@pytest.fixture(scope="module")
def learned_source(learned_run: Path, small_synth: tuple[Path, Path], tmp_path_factory) -> Path:
    """The session's learning fold (150 steps, trained for the default suite anyway) as a source: enough for the
    command's plumbing and errors, too weak for the quality tests (it keeps 2 of 60 images, scoring 0.80)."""
    shape = list(image_shape(small_synth[0] / "train_images"))
    return _ensemble(learned_run, shape, tmp_path_factory.mktemp("pseudo_learned") / "ens")


# The source of the quality tests: the session's learning fit trained 8x longer (240 epochs = 1200 steps, 2-5
# min on the 2 shared cores). On the default seed 42 it keeps 42 of the 60 test images, scoring 0.980 against 0.934
# for all images (a random 42 of them: 0.934 +- 0.009, so the rule's +0.046 is 5 sd). Training seeds 0 / 1 gave
# +0.047 / +0.012: what is left is the rare classes 1, 2 and 4, which 40 training images do not teach it (it
# is confidently negative on all of them), missed alike on kept and dropped images. 600 steps was a coin flip:
# +0.013 on seed 42 (1 sd of a random subset). Stricter cut-offs (0.99/0.01 ...) or 120 training images did
# not do better, so the defaults are tested.
SOURCE_EPOCHS = 240


@pytest.fixture(scope="module")
def source_run(small_synth: tuple[Path, Path], tmp_path_factory) -> Path:
    """The session's learning fit (tiny.yaml on 32x160 images, fold 0) trained 8x longer (slow tests only)."""
    from tests.conftest_training import TINY, TINY_LEARNING, fit

    run = tmp_path_factory.mktemp("pseudo_source_run") / "fold-0"
    return fit(TINY, *small_synth, run, *TINY_LEARNING, "--trainer.max_epochs", SOURCE_EPOCHS)


@pytest.fixture(scope="module")
def source(source_run: Path, small_synth: tuple[Path, Path], tmp_path_factory) -> Path:
    """An ensemble dir of that fold (default thresholds)."""
    shape = list(image_shape(small_synth[0] / "train_images"))
    return _ensemble(source_run, shape, tmp_path_factory.mktemp("pseudo_source") / "ens")


@pytest.fixture(scope="module")
def test_set(small_synth: tuple[Path, Path], tmp_path_factory) -> Path:
    """60 fresh synthetic 'test' images (another seed) of the learning run's size, with their truth."""
    h, w = image_shape(small_synth[0] / "train_images")
    out = tmp_path_factory.mktemp("pseudo_test") / "data"
    run_steel("synth", out, "--n-train", 0, "--n-test", 60, "--seed", 11, "--height", h, "--width", w)
    return out


@pytest.fixture(scope="module")
def pseudo_dir(source: Path, test_set: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pseudo") / "p"
    proc = run_steel("pseudo", source, "--images", test_set / "test_images", "--out", out, "--workers", 0)
    assert "pseudo: kept" in proc.stdout
    return out


@pytest.mark.slow
def test_pseudo_labels_beat_the_source_on_all_images(pseudo_dir, source, test_set, tmp_path):
    summary = json.loads((pseudo_dir / "pseudo.json").read_text())
    manifest = pd.read_csv(pseudo_dir / "manifest.csv")
    names = sorted(p.name for p in (test_set / "test_images").iterdir())
    assert manifest["ImageId"].tolist() == names and manifest["kept"].sum() == summary["n_kept"]
    assert summary["n_kept"] >= 3, summary  # the rule keeps something of a trained fold
    kept = manifest[manifest["kept"]]
    cls = kept[[f"cls_{c}" for c in range(1, 5)]].to_numpy()
    assert ((cls > 0.95) | (cls < 0.05)).all()
    assert manifest.loc[~manifest["kept"], "reason"].str.startswith("class ").all()
    table = read_train(pseudo_dir)  # a Kaggle-layout data dir
    assert sorted(table["ImageId"]) == sorted(kept["ImageId"])

    # the source's own predictions on every test image, and their dice against the synthetic truth
    sub = tmp_path / "all.csv"
    run_steel("predict", source, "--images", test_set / "test_images", "--out", sub, "--workers", 0)
    truth = test_set / "test_truth.csv"
    all_dice = score_submission(sub, truth, test_set / "test_images").iloc[:, 1:].to_numpy().mean()
    # the pseudo labels as a submission over the kept images, scored the same way
    rles = [[r[f"rle_{c}"] for c in range(1, 5)] for r in table.to_dict("records")]
    write_submission(table["ImageId"].tolist(), rles, tmp_path / "kept.csv")
    kept_dice = score_submission(tmp_path / "kept.csv", truth, pseudo_dir / "train_images").iloc[:, 1:]
    print(
        f"kept {summary['n_kept']} of 60: dice {kept_dice.to_numpy().mean():.4f}, all images {all_dice:.4f}"
    )
    assert kept_dice.to_numpy().mean() > all_dice, (kept_dice.to_numpy().mean(), all_dice)
    # and they are exactly the source's post-processed masks of those images
    pred = read_submission(sub).set_index(["ImageId", "ClassId"])["EncodedPixels"]
    for r in table.to_dict("records"):
        assert [pred[(r["ImageId"], c)] for c in range(1, 5)] == [r[f"rle_{c}"] for c in range(1, 5)]


def test_pseudo_cut_offs_change_what_is_kept(learned_source, test_set, tmp_path):
    images = test_set / "test_images"
    strict = run_steel(
        "pseudo", learned_source, "--images", images, "--out", tmp_path / "strict", "--workers", 0
    )
    assert "pseudo: kept" in strict.stdout
    out = tmp_path / "loose"
    run_steel("pseudo", learned_source, "--images", images, "--out", out, "--hi", "0.6", "--lo", "0.4",
              "--workers", 0)  # fmt: skip
    loose = json.loads((out / "pseudo.json").read_text())
    assert loose["hi"] == [0.6] * 4 and loose["lo"] == [0.4] * 4
    # looser cut-offs keep every image the defaults keep (and here more)
    kept = {
        d: set(pd.read_csv(tmp_path / d / "manifest.csv").query("kept")["ImageId"])
        for d in ("strict", "loose")
    }
    assert kept["strict"] <= kept["loose"] and len(kept["loose"]) == loose["n_kept"] > len(kept["strict"])
    # run again into the same dir: replaced, not mixed
    run_steel("pseudo", learned_source, "--images", images, "--out", out, "--hi", "1.0", "--lo", "0.0",
              "--workers", 0)  # fmt: skip
    assert json.loads((out / "pseudo.json").read_text())["n_kept"] == 0
    assert not list((out / "train_images").iterdir())


def test_pseudo_bad_inputs_one_line(learned_source, test_set, tmp_path):
    source, images = learned_source, test_set / "test_images"
    (tmp_path / "file").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    corrupt = tmp_path / "corrupt"  # two good images and a broken one
    corrupt.mkdir()
    for name in sorted(p.name for p in images.iterdir())[:2]:
        shutil.copyfile(images / name, corrupt / name)
    (corrupt / "broken.jpg").write_bytes(b"not a jpeg")
    o = ["--out", tmp_path / "o"]
    cases = [
        ([source, "--images", tmp_path / "missing", *o], "image directory not found"),
        ([source, "--images", images, "--out", tmp_path / "file"], "is a file"),
        ([source, "--images", images, "--out", tmp_path / "busy"], "notes.txt: "),
        ([source, "--images", images, *o, "--hi", "0.2", "--lo", "0.3"], "need 0 <= lo <= hi"),
        ([source, "--images", images, *o, "--hi", "1,2"], "--hi '1,2'"),
        ([tmp_path / "nope.pt2", "--images", images, *o], "nope.pt2: not found"),
        (
            [source, "--images", corrupt, *o, "--workers", 0],
            f"{corrupt / 'broken.jpg'}: not a readable image",
        ),
        (
            [source, "--images", corrupt, *o, "--workers", 1],
            f"{corrupt / 'broken.jpg'}: not a readable image",
        ),
        ([source, "--images", images, *o, "--workers", -1], "--workers -1: must be >= 0"),
        ([source, "--images", images, *o, "--device", "cuda"], "--device cuda: no CUDA device available"),
    ]
    for args, match in cases:
        proc = run_steel("pseudo", *args, check=False, env={"CUDA_VISIBLE_DEVICES": ""})
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith("steel pseudo: error: ") and match in last, (
            args,
            last,
        )
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine" and not (tmp_path / "o").exists()


def test_pseudo_exported_source_needs_its_image_size(tmp_path_factory, synth_dir, test_set, tmp_path):
    """An exported file pseudo-labels images of the size it was exported for; other sizes: one line naming the
    image (not the exported program's shape-guard traceback)."""
    from tests._ensemble import small_exported

    _, pt2 = small_exported(tmp_path_factory)  # one tiny net exported for 64x320 images (shared with others)
    out = tmp_path / "ok"
    steel_in_process("pseudo", pt2, "--images", synth_dir / "test_images", "--out", out, "--workers", 0)
    summary = json.loads((out / "pseudo.json").read_text())
    assert summary["n_images"] == 20 and summary["image_size"] == [64, 320]
    proc = run_steel(
        "pseudo", pt2, "--images", test_set / "test_images", "--out", tmp_path / "o", check=False
    )
    name = sorted(p.name for p in (test_set / "test_images").iterdir())[0]
    want = f"{test_set / 'test_images' / name}: image is 32x160, {pt2} was exported for 64x320 images"
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"steel pseudo: error: {want}"
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_fold_trained_with_pseudo_labels_is_not_worse(pseudo_dir, source_run, small_synth, tmp_path):
    """The source's fit (same recipe, data, fold and epochs) plus the pseudo labels (30 % of each epoch): its best
    val/dice on the fold's validation images is not below the plain fold's (0.01 of seed noise allowed)."""
    from tests.conftest_training import TINY, TINY_LEARNING

    data, folds = small_synth
    run = tmp_path / "fold-0"
    check(steel("fit", "--config", TINY, "--data.data_dir", data, "--data.folds_csv", folds, "--data.fold", 0,
                "--run_dir", run, *TINY_LEARNING, "--trainer.max_epochs", SOURCE_EPOCHS, "--data.pseudo_dir",
                pseudo_dir, "--data.pseudo_share", 0.3, timeout=3600))  # fmt: skip
    plain = json.loads((source_run / "metrics.json").read_text())["best_val_dice"]
    with_pseudo = json.loads((run / "metrics.json").read_text())["best_val_dice"]
    print(f"best val/dice fold 0: plain {plain:.4f}, with pseudo labels {with_pseudo:.4f}")
    assert with_pseudo >= plain - 0.01
