"""Data: SteelDataset (grey image, 4 masks, 4 labels), epoch samplers and the LightningDataModule of one fold.

A training/validation item is a dict, what loader workers send: 2 bytes a pixel rather than 8 (the workers
collate a batch's tensors into one shared-memory buffer they reuse once released, ``steel.collate``)
  image     uint8 (1, H, W) grey
  mask      uint8 (H, W), bit c set where class c + 1 has a defect (``pack_masks``)
  image_id  str
and a batch, once on the device (``SteelDataModule.on_after_batch_transfer`` -> ``prepare_batch``), is what
the model takes: image float32 (B, 1, H, W) in [0, 1] (/ 255), mask uint8 (B, 4, H, W) 0/1 and
label float32 (B, 4), 1 where the class has pixels in ``mask``.
Training items are cropped/resized/augmented; validation items are the full native image (the model resizes to
its ``input_size`` itself, so validation and inference share one path). Prediction items have no mask/label.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from steel import N_CLASSES
from steel.augment import TrainTransform, build_train_transform
from steel.collate import SlotCollate
from steel.errors import SteelError
from steel.folds import split
from steel.images import read_grey  # truncated/corrupt files: SteelError naming them
from steel.labels import CLASSES, list_images, read_train
from steel.lifecycle import WorkerInit
from steel.rle import RunMasks, pack_masks

cv2.setNumThreads(0)  # workers parallelise; OpenCV's own threads only oversubscribe the cores

RLE_COLS = [f"rle_{c}" for c in CLASSES]
HAS_COLS = [f"has_{c}" for c in CLASSES]


class SteelDataset(Dataset):
    """Images of ``images_dir`` named by ``table.ImageId`` with masks from its rle_1..rle_4 columns.

    ``transform`` maps (image uint8 (H, W), masks ``steel.rle.RunMasks`` of (4, H, W)) -> (image uint8 (h, w),
    masks uint8 (4, h, w)), e.g. a ``steel.augment.TrainTransform``. ``with_masks=False`` yields only image and
    image_id (unlabeled images).
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        table: pd.DataFrame,
        shape: tuple[int, int] | None = None,
        transform: Callable[[np.ndarray, RunMasks], tuple[np.ndarray, np.ndarray]] | None = None,
        with_masks: bool = True,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.ids = table["ImageId"].tolist()
        self.with_masks = with_masks
        self.rles = table[RLE_COLS].to_numpy().tolist() if with_masks else None
        self.shape = tuple(shape) if shape is not None else table.attrs.get("shape")
        self.transform = transform
        # RLE runs parsed once (a crop then decodes only its window); forked loader workers share them
        self.masks = None
        if with_masks and self.shape is not None:
            self.masks = [RunMasks(r, self.shape) for r in self.rles]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        image_id = self.ids[i]
        img = read_grey(self.images_dir / image_id)
        if not self.with_masks:
            return {"image": torch.from_numpy(img)[None], "image_id": image_id}
        if self.shape is not None and img.shape != tuple(self.shape):
            raise SteelError(
                f"{self.images_dir / image_id}: image is {img.shape[0]}x{img.shape[1]}, labels expect {self.shape[0]}x{self.shape[1]}"
            )
        masks = self.masks[i] if self.masks is not None else RunMasks(self.rles[i], img.shape)
        if isinstance(self.transform, TrainTransform):  # the window decoded straight into the mask bits
            img, packed = self.transform.packed(img, masks)
        elif self.transform is not None:
            img, m = self.transform(img, masks)
            packed = pack_masks(m)
        else:
            packed = masks.packed_window(0, 0, *masks.shape)
        return {"image": torch.from_numpy(img)[None], "mask": torch.from_numpy(packed), "image_id": image_id}


def unpack_masks(packed: torch.Tensor, n: int = N_CLASSES) -> torch.Tensor:
    """uint8 (..., H, W) packed by ``pack_masks`` -> uint8 (..., n, H, W) 0/1, on the input's device."""
    bits = torch.arange(n, dtype=torch.uint8, device=packed.device).view(n, 1, 1)
    return (packed.unsqueeze(-3) >> bits) & 1


def prepare_batch(batch: dict) -> dict:
    """A collated batch of items -> what the model takes, in place, on the batch's device: images float32 in
    [0, 1] (/ 255), masks unpacked to (B, 4, H, W), labels (B, 4) from the masks (where the batch has none).
    Batches already in that form pass unchanged."""
    if batch["image"].dtype == torch.uint8:
        batch["image"] = batch["image"].float().div_(255.0)
    if "mask" in batch and batch["mask"].dim() == batch["image"].dim() - 1:
        batch["mask"] = unpack_masks(batch["mask"])
    if "mask" in batch and "label" not in batch:
        batch["label"] = batch["mask"].flatten(2).amax(2).float()
    return batch


class _EpochSampler(Sampler[int]):
    """Base for samplers that draw a new order each epoch, the same on every DDP rank (seeded by (seed, epoch))."""

    def __init__(self, has: np.ndarray, seed: int = 0) -> None:
        self.has = np.asarray(has, dtype=bool).reshape(len(has), -1)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self) -> np.random.Generator:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1  # next epoch differs even if nobody calls set_epoch
        return rng


class BalancedSampler(_EpochSampler):
    """Every image once an epoch; images are grouped (defect-free, or their rarest class 1..4) and the groups are
    cycled: one image of each group in turn (shuffled within groups) until the groups run out."""

    def __init__(self, has: np.ndarray, seed: int = 0) -> None:
        super().__init__(has, seed)
        freq = self.has.sum(0)
        rarity = np.where(self.has, freq[None, :], np.iinfo(np.int64).max)
        self.group = np.where(self.has.any(1), rarity.argmin(1) + 1, 0)

    def __len__(self) -> int:
        return len(self.group)

    def __iter__(self) -> Iterator[int]:
        rng = self._rng()
        perm = rng.permutation(len(self.group))
        g = self.group[perm]
        by_group = np.argsort(g, kind="stable")
        counts = np.bincount(g, minlength=N_CLASSES + 1)
        rank = np.empty(len(g), np.int64)
        rank[by_group] = np.arange(len(g)) - np.repeat(np.cumsum(counts) - counts, counts)
        order = np.lexsort((g, rank))  # primary: rank within group, then group
        return iter(perm[order].tolist())


class NegativesSampler(_EpochSampler):
    """All defect images plus ``round(fraction * n_defect_free)`` defect-free ones, redrawn each epoch, shuffled."""

    def __init__(self, has: np.ndarray, fraction: float = 0.5, seed: int = 0) -> None:
        super().__init__(has, seed)
        if not 0.0 <= fraction <= 1.0:
            raise SteelError(f"negatives_fraction {fraction}: must be in [0, 1]")
        defect = self.has.any(1)
        self.pos, self.neg = np.flatnonzero(defect), np.flatnonzero(~defect)
        self.k = int(round(fraction * len(self.neg)))

    def __len__(self) -> int:
        return len(self.pos) + self.k

    def __iter__(self) -> Iterator[int]:
        rng = self._rng()
        idx = np.concatenate([self.pos, rng.choice(self.neg, self.k, replace=False)])
        return iter(rng.permutation(idx).tolist())


class UnrepeatedDistributedSampler(DistributedSampler):
    """Rank r gets items r, r + world, ...: no padding, so DDP validation sees each image exactly once."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


def _check_size(value: Sequence[int] | None, name: str) -> list[int] | None:
    if value is None:
        return None
    value = [int(v) for v in value]
    if len(value) != 2 or any(v <= 0 or v % 32 for v in value):
        raise SteelError(f"{name} {value}: need [height, width], positive multiples of 32")
    return value


class SteelDataModule(pl.LightningDataModule):
    """One fold of a folds CSV: trains on every other fold, validates (and tests) on ``fold``.

    Args:
        data_dir: Kaggle-layout directory (train.csv, train_images/).
        folds_csv: CSV ImageId, fold, has_1..has_4 (``steel folds``).
        fold: validation fold.
        batch_size / val_batch_size: per-device batch sizes (val defaults to batch_size).
        train_crop: [h, w] random crop for training (multiples of 32), e.g. [256, 512]; None = whole image.
        train_resize: [h, w] resize before cropping/augmenting; None = native size.
        val_size: model input [h, w] at validation/inference (linked to ``model.input_size``; the model resizes
            the native image to it and its output back); None = native size.
        augment: pipeline name (none, light, medium, heavy).
        defect_crop_p: probability that a training crop is centred to contain defect pixels.
        blackout_p: probability of the defect blackout (one class's region filled with background, label dropped).
        avoid_black_crop: a random training crop that is mostly the black margin beyond the strip's edge moves to
            the end of the image that shows steel (9th place; ``steel.augment.mostly_black``).
        sampler: random | balanced | negatives (all defect images + ``negatives_fraction`` of defect-free ones).
        predict_dir: images for ``steel predict --config`` (default data_dir/test_images).
        pseudo_dir: a ``steel pseudo`` output dir; its images join the training epochs of every fold, never
            validation (``steel.pseudo.mix_pseudo``), as ``pseudo_share`` of each epoch's items.
    """

    def __init__(
        self,
        data_dir: str = "data/severstal",
        folds_csv: str = "folds/severstal_10f_s42.csv",
        fold: int = 0,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        train_crop: list[int] | None = None,
        train_resize: list[int] | None = None,
        val_size: list[int] | None = None,
        augment: Literal["none", "light", "medium", "heavy"] = "light",
        defect_crop_p: float = 0.0,
        blackout_p: float = 0.0,
        avoid_black_crop: bool = False,
        sampler: Literal["random", "balanced", "negatives"] = "random",
        negatives_fraction: float = 0.5,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        predict_dir: str | None = None,
        seed: int = 42,
        pseudo_dir: str | None = None,
        pseudo_share: float = 0.3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_crop = _check_size(train_crop, "train_crop")
        self.train_resize = _check_size(train_resize, "train_resize")
        self.val_size = _check_size(val_size, "val_size")
        if batch_size < 1:
            raise SteelError(f"batch_size {batch_size}: must be at least 1")
        self.train_transform = build_train_transform(
            augment, self.train_crop, self.train_resize, defect_crop_p, blackout_p, avoid_black_crop
        )
        if sampler == "negatives" and not 0.0 <= negatives_fraction <= 1.0:
            raise SteelError(f"negatives_fraction {negatives_fraction}: must be in [0, 1]")
        self.train_set: SteelDataset | None = None
        self.val_set: SteelDataset | None = None
        self.predict_set: SteelDataset | None = None

    def _tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        hp = self.hparams
        table = read_train(hp.data_dir)
        train_ids, val_ids = split(hp.folds_csv, hp.fold)
        known = set(table["ImageId"])
        missing = [i for i in train_ids + val_ids if i not in known]
        if missing:
            raise SteelError(
                f"{hp.folds_csv}: image {missing[0]} is not in {Path(hp.data_dir) / 'train_images'} ({len(missing)} such)"
            )
        by_id = table.set_index("ImageId", drop=False)
        train, val = by_id.loc[train_ids].reset_index(drop=True), by_id.loc[val_ids].reset_index(drop=True)
        train.attrs["shape"] = val.attrs["shape"] = table.attrs["shape"]
        return train, val

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        images = Path(hp.data_dir) / "train_images"
        if stage in (None, "fit", "validate", "test") and self.val_set is None:
            train, val = self._tables()
            self.train_table, self.val_table = train, val
            self.train_set = SteelDataset(images, train, transform=self.train_transform)
            self.val_set = SteelDataset(images, val)
        if stage == "predict" and self.predict_set is None:
            pdir = Path(hp.predict_dir) if hp.predict_dir else Path(hp.data_dir) / "test_images"
            names = list_images(pdir)
            if not names:
                raise SteelError(f"{pdir}: no images to predict")
            self.predict_set = SteelDataset(pdir, pd.DataFrame({"ImageId": names}), with_masks=False)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Items -> model batch on the device (``prepare_batch``): cheaper there than in the loader workers."""
        return prepare_batch(batch)

    def _loader(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = False,
        sampler: Sampler | None = None,
        drop_last: bool = False,
    ) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
            persistent_workers=hp.persistent_workers and hp.num_workers > 0,
            drop_last=drop_last,
            collate_fn=SlotCollate(hp.num_workers) if hp.num_workers > 0 else None,  # buffers reused
            worker_init_fn=WorkerInit() if hp.num_workers > 0 else None,  # workers die with this process
        )

    def train_sampler(self) -> Sampler | None:
        """The epoch sampler named by ``sampler`` (None for random: the loader shuffles)."""
        hp = self.hparams
        has = self.train_table[HAS_COLS].to_numpy()
        if hp.sampler == "balanced":
            return BalancedSampler(has, seed=hp.seed)
        if hp.sampler == "negatives":
            return NegativesSampler(has, hp.negatives_fraction, seed=hp.seed)
        return None

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup('fit') first"
        drop_last = len(self.train_set) > self.hparams.batch_size  # BatchNorm dislikes a last batch of 1
        dataset, sampler = self.train_set, self.train_sampler()
        if self.hparams.pseudo_dir:
            from steel.pseudo import mix_pseudo

            known = set(self.train_table["ImageId"]) | set(self.val_table["ImageId"])
            dataset, sampler = mix_pseudo(dataset, sampler, self.hparams.pseudo_dir, self.hparams.pseudo_share,
                                          known, self.hparams.seed)  # fmt: skip
        return self._loader(
            dataset, self.hparams.batch_size, shuffle=True, sampler=sampler, drop_last=drop_last
        )

    def _eval_sampler(self, dataset: Dataset) -> Sampler | None:
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            return UnrepeatedDistributedSampler(dataset, trainer.world_size, trainer.global_rank)
        return None

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup('validate') first"
        bs = self.hparams.val_batch_size or self.hparams.batch_size
        return self._loader(self.val_set, bs, sampler=self._eval_sampler(self.val_set))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        assert self.predict_set is not None, "call setup('predict') first"
        bs = self.hparams.val_batch_size or self.hparams.batch_size
        return self._loader(self.predict_set, bs)
