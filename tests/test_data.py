"""SteelDataset / SteelDataModule / samplers / augmentations on the synthetic data."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from steel.augment import AUGMENTS, DefectBlackout, build_train_transform
from steel.data import (
    BalancedSampler,
    NegativesSampler,
    SteelDataModule,
    SteelDataset,
    UnrepeatedDistributedSampler,
)
from steel.errors import SteelError
from steel.folds import split
from steel.labels import masks_of, read_train

pytest_plugins = ["tests.conftest_training"]


@pytest.fixture(scope="module")
def table(synth_dir: Path) -> pd.DataFrame:
    return read_train(synth_dir)


def _dm(synth_dir: Path, folds_csv: Path, **kw) -> SteelDataModule:
    args = {"batch_size": 4, "num_workers": 0, "pin_memory": False, **kw}
    dm = SteelDataModule(str(synth_dir), str(folds_csv), 1, **args)
    dm.setup("fit")
    return dm


def test_dataset_item_contract(synth_dir: Path, table: pd.DataFrame) -> None:
    ds = SteelDataset(synth_dir / "train_images", table)
    i = int(np.flatnonzero(table[[f"has_{c}" for c in range(1, 5)]].sum(axis=1).to_numpy() > 0)[0])
    item = ds[i]
    assert item["image"].shape == (1, 64, 320) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    expected_img = cv2.imread(str(synth_dir / "train_images" / table.ImageId[i]), cv2.IMREAD_GRAYSCALE)
    torch.testing.assert_close(item["image"][0], torch.from_numpy(expected_img).float() / 255)
    assert item["mask"].shape == (4, 64, 320) and item["mask"].dtype == torch.uint8
    np.testing.assert_array_equal(item["mask"].numpy(), masks_of(table.iloc[i], (64, 320)))
    assert item["label"].tolist() == table.loc[i, [f"has_{c}" for c in range(1, 5)]].astype(float).tolist()
    assert item["image_id"] == table.ImageId[i]


def test_datamodule_split_and_batches(synth_dir: Path, folds_csv: Path) -> None:
    dm = _dm(synth_dir, folds_csv, train_crop=[64, 160], augment="light")
    train_ids, val_ids = split(folds_csv, 1)
    assert dm.val_set.ids == val_ids and sorted(dm.train_set.ids) == sorted(train_ids)
    assert not set(dm.val_set.ids) & set(dm.train_set.ids)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 64, 160) and batch["mask"].shape == (4, 4, 64, 160)
    torch.testing.assert_close(batch["label"], batch["mask"].flatten(2).amax(2).float())
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (4, 1, 64, 320)  # full native image; the model resizes to input_size itself


def test_train_resize(synth_dir: Path, folds_csv: Path) -> None:
    dm = _dm(synth_dir, folds_csv, train_resize=[32, 160], augment="none")
    item = dm.train_set[0]
    assert item["image"].shape == (1, 32, 160) and item["mask"].shape == (4, 32, 160)
    assert set(np.unique(item["mask"].numpy())) <= {0, 1}


@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_named_pipelines_keep_shapes_and_binary_masks(
    name: str, synth_dir: Path, table: pd.DataFrame, seeded: None
) -> None:
    ds = SteelDataset(
        synth_dir / "train_images", table, transform=build_train_transform(name, crop=[64, 128])
    )
    for i in range(6):
        item = ds[i]
        assert item["image"].shape == (1, 64, 128) and item["mask"].shape == (4, 64, 128)
        assert set(np.unique(item["mask"].numpy())) <= {0, 1}
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0


def test_defect_aware_crop(synth_dir: Path, table: pd.DataFrame, seeded: None) -> None:
    defect = table[table[[f"has_{c}" for c in range(1, 5)]].sum(axis=1) > 0].reset_index(drop=True)
    defect.attrs = table.attrs
    ds = SteelDataset(
        synth_dir / "train_images",
        defect,
        transform=build_train_transform("none", crop=[32, 64], defect_crop_p=1.0),
    )
    assert all(ds[i]["mask"].any() for i in range(len(ds)))
    plain = SteelDataset(
        synth_dir / "train_images", defect, transform=build_train_transform("none", crop=[32, 64])
    )
    # small random crops miss small defects sometimes; the defect-aware crop never does
    assert not all(plain[i]["mask"].any() for i in range(len(plain)) for _ in range(3))


def test_bad_sizes_and_names() -> None:
    with pytest.raises(SteelError, match="train_crop"):
        build_train_transform("light", crop=[64, 100])
    with pytest.raises(SteelError, match="augment 'wild'"):
        build_train_transform("wild")
    with pytest.raises(SteelError, match="defect_crop_p"):
        build_train_transform("light", defect_crop_p=2)


def test_defect_blackout_removes_one_class() -> None:
    rng = np.random.default_rng(0)
    image = (100 + rng.normal(0, 3, (32, 64))).clip(0, 255).astype(np.uint8)
    masks = np.zeros((32, 64, 4), np.uint8)
    masks[10:20, 10:30, 2] = 1
    image[10:20, 10:30] = 250  # a bright defect of class 3
    np.random.seed(0)
    out, out_masks = DefectBlackout(p=1.0, dilate=1)(image, masks)
    assert out_masks[..., 2].sum() == 0 and out_masks.sum() == 0
    assert abs(float(np.median(out[10:20, 10:30])) - 100) < 5  # filled with background, not the defect
    np.testing.assert_array_equal(out[25:], image[25:])  # far pixels untouched
    assert masks[..., 2].sum() == 200  # input not modified
    # with two classes only one goes, and the other's pixels stay as they were
    masks[0:5, 40:60, 0] = 1
    for seed in range(5):
        np.random.seed(seed)
        out, out_masks = DefectBlackout(p=1.0)(image, masks)
        kept = out_masks.reshape(-1, 4).any(0)
        assert kept.sum() == 1
        c = int(np.flatnonzero(kept)[0])
        assert (out[masks[..., c] == 1] == image[masks[..., c] == 1]).all()
    # p=0 and defect-free images are returned unchanged
    assert DefectBlackout(p=0.0)(image, masks)[0] is image
    assert DefectBlackout(p=1.0)(image, np.zeros_like(masks))[0] is image


def test_blackout_in_dataset_drops_label(synth_dir: Path, table: pd.DataFrame) -> None:
    one = table[table[[f"has_{c}" for c in range(1, 5)]].sum(axis=1) == 1].head(3).reset_index(drop=True)
    one.attrs = table.attrs
    ds = SteelDataset(synth_dir / "train_images", one, blackout=DefectBlackout(p=1.0))
    for i in range(len(one)):
        assert ds[i]["label"].sum() == 0 and ds[i]["mask"].sum() == 0


def _has(n_free: int = 10) -> np.ndarray:
    has = np.zeros((n_free + 12, 4), int)
    has[n_free : n_free + 2, 0] = 1  # 2 class-1 images
    has[n_free + 2 : n_free + 3, 1] = 1  # 1 class-2 image
    has[n_free + 3 : n_free + 9, 2] = 1  # 6 class-3 images
    has[n_free + 9 :, 3] = 1  # 3 class-4 images
    has[n_free + 3, 1] = 1  # a class 2+3 image: grouped by its rarer class (2)
    return has


def test_balanced_sampler_cycles_groups_and_covers_epoch() -> None:
    has = _has()
    s = BalancedSampler(has, seed=1)
    assert s.group[13] == 2  # rarest class of the 2+3 image
    first, second = list(s), list(s)
    assert sorted(first) == list(range(len(has))) and sorted(second) == list(range(len(has)))
    assert first != second  # reshuffled each epoch
    groups = s.group[np.array(first)]
    # round 1 has one image of each of the 5 groups (defect-free, 1, 2, 3, 4)
    assert sorted(groups[:5].tolist()) == [0, 1, 2, 3, 4]
    # same (seed, epoch) -> same order on every DDP rank
    s2 = BalancedSampler(has, seed=1)
    s2.set_epoch(1)
    assert list(s2) == second


def test_negatives_sampler() -> None:
    has = _has(n_free=20)
    s = NegativesSampler(has, fraction=0.25, seed=0)
    assert len(s) == 12 + 5
    epochs = [list(s) for _ in range(4)]
    for order in epochs:
        assert len(order) == len(set(order)) == 17
        assert set(range(20, 32)) <= set(order)  # every defect image
        assert len([i for i in order if i < 20]) == 5
    assert len({tuple(sorted(i for i in o if i < 20)) for o in epochs}) > 1  # negatives redrawn
    with pytest.raises(SteelError, match="negatives_fraction"):
        NegativesSampler(has, fraction=1.5)


def test_datamodule_samplers(synth_dir: Path, folds_csv: Path) -> None:
    dm = _dm(synth_dir, folds_csv, sampler="negatives", negatives_fraction=0.0)
    ids = [i for b in dm.train_dataloader() for i in b["image_id"]]
    table = dm.train_table.set_index("ImageId")
    defect = set(table.index[table[[f"has_{c}" for c in range(1, 5)]].sum(axis=1) > 0])
    assert set(ids) <= defect and len(ids) >= len(defect) - 3  # drop_last may drop < batch_size
    dm = _dm(synth_dir, folds_csv, sampler="balanced")
    assert isinstance(dm.train_dataloader().sampler, BalancedSampler)


def test_unrepeated_distributed_sampler() -> None:
    data = list(range(11))
    parts = [list(UnrepeatedDistributedSampler(data, 3, r)) for r in range(3)]
    assert sorted(sum(parts, [])) == data and [len(p) for p in parts] == [4, 4, 3]
    assert [len(UnrepeatedDistributedSampler(data, 3, r)) for r in range(3)] == [4, 4, 3]


def test_user_mistakes(synth_dir: Path, folds_csv: Path, tmp_path: Path) -> None:
    with pytest.raises(SteelError, match="val_size"):
        SteelDataModule(str(synth_dir), str(folds_csv), 0, val_size=[64, 300])
    bad = tmp_path / "folds.csv"
    pd.read_csv(folds_csv).assign(ImageId=lambda d: d.ImageId.where(d.index != 0, "ghost.jpg")).to_csv(
        bad, index=False
    )
    with pytest.raises(SteelError, match="ghost.jpg is not in"):
        SteelDataModule(str(synth_dir), str(bad), 0).setup("fit")
    with pytest.raises(SteelError, match="fold 7 outside"):
        SteelDataModule(str(synth_dir), str(folds_csv), 7).setup("fit")


def test_predict_set(synth_dir: Path, folds_csv: Path) -> None:
    dm = SteelDataModule(str(synth_dir), str(folds_csv), 0, batch_size=5, num_workers=0, pin_memory=False)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["image"].shape == (5, 1, 64, 320) and "mask" not in batch
    assert len(dm.predict_set) == 20
