"""SteelDataset / SteelDataModule / samplers / augmentations on the synthetic data."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from steel import rle
from steel.augment import AUGMENTS, DefectAwareCrop, DefectBlackout, build_train_transform
from steel.data import (
    BalancedSampler,
    NegativesSampler,
    SteelDataModule,
    SteelDataset,
    UnrepeatedDistributedSampler,
    pack_masks,
    prepare_batch,
    unpack_masks,
)
from steel.errors import SteelError
from steel.folds import split
from steel.images import read_grey
from steel.labels import masks_of, read_train
from steel.rle import RunMasks

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
    assert item["image"].shape == (1, 64, 320) and item["image"].dtype == torch.uint8
    expected_img = cv2.imread(str(synth_dir / "train_images" / table.ImageId[i]), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(item["image"][0].numpy(), expected_img)
    assert set(item) == {"image", "mask", "image_id"}  # labels are made from the masks on the device
    assert (
        item["mask"].shape == (64, 320) and item["mask"].dtype == torch.uint8
    )  # packed: bit c = class c + 1
    truth = masks_of(table.iloc[i], (64, 320))
    np.testing.assert_array_equal(unpack_masks(item["mask"]).numpy(), truth)
    np.testing.assert_array_equal(item["mask"].numpy(), (truth << np.arange(4)[:, None, None]).sum(0))
    batch = prepare_batch(torch.utils.data.default_collate([item]))
    assert batch["label"].tolist() == [table.loc[i, [f"has_{c}" for c in range(1, 5)]].astype(float).tolist()]
    assert item["image_id"] == table.ImageId[i]


def test_datamodule_split_and_batches(synth_dir: Path, folds_csv: Path) -> None:
    dm = _dm(synth_dir, folds_csv, train_crop=[64, 160], augment="light")
    train_ids, val_ids = split(folds_csv, 1)
    assert dm.val_set.ids == val_ids and sorted(dm.train_set.ids) == sorted(train_ids)
    assert not set(dm.val_set.ids) & set(dm.train_set.ids)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 64, 160) and batch["mask"].shape == (4, 64, 160)
    assert batch["image"].dtype == torch.uint8 and batch["mask"].dtype == torch.uint8
    raw, packed = batch["image"].clone(), batch["mask"].clone()
    batch = dm.on_after_batch_transfer(batch, 0)  # what the Trainer does once the batch is on the device
    assert batch["image"].dtype == torch.float32 and batch["mask"].shape == (4, 4, 64, 160)
    torch.testing.assert_close(batch["image"], raw.float() / 255)
    assert set(batch["mask"].unique().tolist()) <= {0, 1}
    torch.testing.assert_close(
        (batch["mask"] << torch.arange(4, dtype=torch.uint8)[:, None, None]).sum(1, dtype=torch.uint8), packed
    )
    torch.testing.assert_close(batch["label"], batch["mask"].flatten(2).amax(2).float())
    assert prepare_batch(batch) is batch and batch["mask"].shape == (4, 4, 64, 160)  # idempotent
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (4, 1, 64, 320)  # full native image; the model resizes to input_size itself


def test_train_resize(synth_dir: Path, folds_csv: Path) -> None:
    dm = _dm(synth_dir, folds_csv, train_resize=[32, 160], augment="none")
    item = dm.train_set[0]
    assert item["image"].shape == (1, 32, 160) and item["mask"].shape == (32, 160)
    assert set(np.unique(item["mask"].numpy())) <= set(range(16))


@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_named_pipelines_keep_shapes_and_binary_masks(
    name: str, synth_dir: Path, table: pd.DataFrame, seeded: None
) -> None:
    transform = build_train_transform(name, crop=[64, 128], defect_crop_p=1.0)
    ds = SteelDataset(synth_dir / "train_images", table, transform=transform)
    defects = 0
    for i in range(12):
        item = ds[i]
        assert item["image"].shape == (1, 64, 128) and item["mask"].shape == (64, 128)
        assert item["image"].dtype == torch.uint8 and item["mask"].dtype == torch.uint8
        masks = unpack_masks(item["mask"])
        defects += int(masks.any())
        image = cv2.imread(str(synth_dir / "train_images" / table.ImageId[i]), cv2.IMREAD_GRAYSCALE)
        runs = RunMasks(table.loc[i, [f"rle_{c}" for c in range(1, 5)]].tolist(), (64, 320))
        _, out = transform(image, runs)  # 0/1 masks: packing them into bits needs that
        assert out.shape == (4, 64, 128) and out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}
    assert defects >= 4  # the masks went through the augmentations, not only empty ones


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


def test_defect_aware_crop_window() -> None:
    image = np.arange(40 * 100, dtype=np.uint8).reshape(40, 100)
    masks = np.zeros((4, 40, 100), np.uint8)
    masks[3, 30, 90] = 1  # one defect pixel near the bottom-right corner
    runs = RunMasks([rle.encode(m) for m in masks], (40, 100))
    crop = DefectAwareCrop(32, 64, defect_p=1.0)
    rng = np.random.default_rng(0)
    for m_in in (masks, runs):
        for _ in range(20):
            img, m = crop(image, m_in, rng)
            assert img.shape == (32, 64) and m.shape == (4, 32, 64) and m[3].sum() == 1 and m.sum() == 1
            y, x = np.argwhere(m[3])[0]
            np.testing.assert_array_equal(img[y, x], image[30, 90])  # the window around that pixel
            assert np.shares_memory(img, image)  # a view: the copy happens after cropping
    small_img, small_masks = DefectAwareCrop(64, 128)(image, runs, rng)  # smaller input: reflect-padded
    assert small_img.shape == (64, 128) and small_masks.shape == (4, 64, 128) and small_masks[3].sum() >= 1


def test_pack_unpack_round_trip() -> None:
    rng = np.random.default_rng(0)
    masks = (rng.random((4, 5, 7)) < 0.3).astype(np.uint8)
    masks[1] = 0
    packed = pack_masks(masks)
    assert packed.dtype == np.uint8 and packed.shape == (5, 7)
    np.testing.assert_array_equal(unpack_masks(torch.from_numpy(packed)).numpy(), masks)
    batch = torch.from_numpy(np.stack([packed, pack_masks(masks[::-1].copy())]))
    np.testing.assert_array_equal(unpack_masks(batch).numpy(), np.stack([masks, masks[::-1]]))


def test_crop_of_runs_equals_crop_of_arrays(synth_dir: Path, table: pd.DataFrame) -> None:
    """A crop decoded from the RLE runs (what the dataset does) = the same window of the fully decoded masks."""
    crop = DefectAwareCrop(32, 96)
    for i in range(8):
        masks = masks_of(table.iloc[i], (64, 320))
        runs = RunMasks(table.loc[i, [f"rle_{c}" for c in range(1, 5)]].tolist(), (64, 320))
        image = np.zeros((64, 320), np.uint8)
        a = crop(image, masks, np.random.default_rng(i))[1]
        b = crop(image, runs, np.random.default_rng(i))[1]
        np.testing.assert_array_equal(a, b)


def test_workers_draw_different_augmentations_and_runs_repeat(synth_dir: Path, table: pd.DataFrame) -> None:
    """Each DataLoader worker has its own generator (seeded from torch's per-worker seed): two workers given
    the same image crop different windows; the same torch seed gives the same batches again."""
    same = table.iloc[[0] * 8].reset_index(drop=True)
    same.attrs = table.attrs
    ds = SteelDataset(
        synth_dir / "train_images", same, transform=build_train_transform("light", crop=[32, 64])
    )

    def epoch() -> torch.Tensor:
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)
        return torch.cat([b["image"] for b in loader])

    first = epoch()
    assert len({tuple(first[i].flatten().tolist()) for i in range(8)}) > 4  # not one crop per worker step
    torch.testing.assert_close(epoch(), first)


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
    masks = np.zeros((4, 32, 64), np.uint8)
    masks[2, 10:20, 10:30] = 1
    image[10:20, 10:30] = 250  # a bright defect of class 3
    out, out_masks = DefectBlackout(p=1.0, dilate=1)(image, masks, rng)
    assert out_masks[2].sum() == 0 and out_masks.sum() == 0
    assert abs(float(np.median(out[10:20, 10:30])) - 100) < 5  # filled with background, not the defect
    np.testing.assert_array_equal(out[25:], image[25:])  # far pixels untouched
    assert masks[2].sum() == 200  # input not modified
    # with two classes only one goes, and the other's pixels stay as they were
    masks[0, 0:5, 40:60] = 1
    gone = set()
    for seed in range(8):
        out, out_masks = DefectBlackout(p=1.0)(image, masks, np.random.default_rng(seed))
        kept = out_masks.any(axis=(1, 2))
        assert kept.sum() == 1
        c = int(np.flatnonzero(kept)[0])
        gone.add(2 - c)
        assert (out[masks[c] == 1] == image[masks[c] == 1]).all()
    assert gone == {0, 2}  # either class can go
    # p=0 and defect-free images are returned unchanged
    assert DefectBlackout(p=0.0)(image, masks)[0] is image
    assert DefectBlackout(p=1.0)(image, np.zeros_like(masks))[0] is image


def test_blackout_in_dataset_drops_label(synth_dir: Path, table: pd.DataFrame) -> None:
    one = table[table[[f"has_{c}" for c in range(1, 5)]].sum(axis=1) == 1].head(3).reset_index(drop=True)
    one.attrs = table.attrs
    ds = SteelDataset(
        synth_dir / "train_images", one, transform=build_train_transform("none", blackout_p=1.0)
    )
    for i in range(len(one)):
        item = ds[i]
        assert item["mask"].sum() == 0  # the only class went (and the label made from the mask with it)
        original = cv2.imread(str(synth_dir / "train_images" / one.ImageId[i]), cv2.IMREAD_GRAYSCALE)
        assert (item["image"][0].numpy() != original).any()  # the defect was painted over


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
    batch = dm.on_after_batch_transfer(next(iter(dm.predict_dataloader())), 0)
    assert batch["image"].shape == (5, 1, 64, 320) and "mask" not in batch
    assert batch["image"].dtype == torch.float32 and 0 <= batch["image"].min() <= batch["image"].max() <= 1
    assert len(dm.predict_set) == 20


@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_packed_pipeline_gives_the_same_pixels_and_masks(
    name: str, synth_dir: Path, table: pd.DataFrame
) -> None:
    """``TrainTransform.packed`` (the dataset's path: the window decoded straight into mask bits, one packed
    mask through the augmentations) = ``pack_masks`` of the plain pipeline, image pixels and random draws
    included, for every named pipeline and crop option; and a training item is exactly that."""
    options = [
        {"crop": [32, 96], "defect_crop_p": 0.5},
        {"crop": [32, 64], "avoid_black": True},
        {"crop": [128, 384]},  # larger than the 64x320 images: reflect-padded arrays
        {},  # no crop: the whole image
        {"crop": [32, 64], "resize": [32, 160]},  # resize and blackout: the plain path, packed at the end
        {"crop": [32, 64], "blackout_p": 1.0},
    ]
    images = [read_grey(synth_dir / "train_images" / i) for i in table.ImageId[:16]]
    runs = [RunMasks(table.loc[i, [f"rle_{c}" for c in range(1, 5)]].tolist(), (64, 320)) for i in range(16)]
    defects = 0
    for kw in options:
        torch.manual_seed(7)  # each transform seeds its generator from torch's seed on first use
        plain, packed = build_train_transform(name, **kw), build_train_transform(name, **kw)
        ds = SteelDataset(synth_dir / "train_images", table, transform=build_train_transform(name, **kw))
        for k in range(16):
            img_a, masks_a = plain(images[k], runs[k])
            img_b, bits = packed.packed(images[k], runs[k])
            item = ds[k]
            assert bits.dtype == np.uint8 and bits.shape == img_b.shape == img_a.shape
            np.testing.assert_array_equal(img_b, img_a)
            np.testing.assert_array_equal(bits, pack_masks(masks_a))
            np.testing.assert_array_equal(item["image"][0].numpy(), img_a)
            np.testing.assert_array_equal(item["mask"].numpy(), bits)
            defects += int(bits.any())
    assert defects >= 20  # masks with pixels went through the augmentations, not only empty ones


def test_read_grey_completeness_check(synth_dir: Path, tmp_path: Path) -> None:
    """A complete JPEG (zero padding or other bytes after its end marker included) reads as OpenCV reads it;
    one that ends early, or has no scan, is a SteelError naming the file. The same for PNG."""
    src = synth_dir / "train_images" / sorted(p.name for p in (synth_dir / "train_images").iterdir())[0]
    data, want = src.read_bytes(), cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
    assert data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9")
    cases = {
        "plain.jpg": data,
        "padded.jpg": data + b"\0" * 10,
        "long_padding.jpg": data + b"\0" * 1000,  # past the tail the quick check looks at: the full scan
        "trailing.jpg": data + b"some trailer",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        np.testing.assert_array_equal(read_grey(tmp_path / name), want)
    sos = data.find(b"\xff\xda")
    bad = {
        "half.jpg": data[: len(data) // 2],
        "cut_before_end.jpg": data[:-2],
        "padded_cut.jpg": data[: len(data) * 2 // 3] + b"\0" * 10,
        "no_scan.jpg": data[:sos] + b"\xff\xd9",  # headers and an end marker, no image data
    }
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SteelError, match=f"{name}: truncated or corrupt JPEG"):
            read_grey(tmp_path / name)
    ok, png = cv2.imencode(".png", want)
    (tmp_path / "whole.png").write_bytes(png.tobytes())
    np.testing.assert_array_equal(read_grey(tmp_path / "whole.png"), want)
    (tmp_path / "cut.png").write_bytes(png.tobytes()[: len(png) // 2])
    with pytest.raises(SteelError, match="cut.png: truncated or corrupt PNG"):
        read_grey(tmp_path / "cut.png")
