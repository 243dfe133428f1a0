"""Competition metric: Dice per (image, class), empty prediction on empty truth = 1, averaged.

``dice_per_pair`` is the numpy reference; ``CompetitionDice`` is the torchmetrics Metric (sum states, so
it is correct under DDP); ``score_submission`` backs ``steel score``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd

from steel import N_CLASSES, rle
from steel.errors import SteelError
from steel.labels import CLASSES, build_table, image_shape, list_images, read_submission


def dice_from_counts(inter: np.ndarray, pred_area: np.ndarray, true_area: np.ndarray) -> np.ndarray:
    """Dice from intersection and areas (any shape); 1 where both areas are 0."""
    inter, pred_area, true_area = (np.asarray(a, np.float64) for a in (inter, pred_area, true_area))
    denom = pred_area + true_area
    return np.where(denom == 0, 1.0, 2.0 * inter / np.maximum(denom, 1))


def dice_per_pair(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Dice of each (image, class) of masks (N, C, H, W) -> (N, C) float64."""
    pred, truth = np.asarray(pred) != 0, np.asarray(truth) != 0
    inter = (pred & truth).sum((-2, -1))
    return dice_from_counts(inter, pred.sum((-2, -1)), truth.sum((-2, -1)))


def _torchmetrics_dice():
    import torch
    from torchmetrics import Metric

    class CompetitionDice(Metric):
        """Mean competition Dice over (image, class) pairs; ``compute`` returns (mean, per-class (C,))."""

        full_state_update = False

        def __init__(self, n_classes: int = N_CLASSES, **kwargs) -> None:
            super().__init__(**kwargs)
            self.add_state(
                "dice_sum", default=torch.zeros(n_classes, dtype=torch.float64), dist_reduce_fx="sum"
            )
            self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

        def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
            """pred, target: (B, C, H, W) binary (bool or 0/1)."""
            pred, target = pred.bool(), target.bool()
            inter = (pred & target).sum((-2, -1)).double()
            denom = pred.sum((-2, -1)).double() + target.sum((-2, -1)).double()
            dice = torch.where(denom == 0, torch.ones_like(denom), 2 * inter / denom.clamp_min(1))
            self.dice_sum += dice.sum(0)
            self.count += pred.shape[0]

        def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
            per_class = self.dice_sum / self.count.clamp_min(1)
            return per_class.mean(), per_class

    return CompetitionDice


def __getattr__(name: str):
    if name == "CompetitionDice":  # built lazily so `steel score` does not import torch
        cls = _torchmetrics_dice()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def score_submission(
    submission: str | os.PathLike, truth_csv: str | os.PathLike, images_dir: str | os.PathLike
) -> pd.DataFrame:
    """Dice per (image, class) of a submission against a train.csv-layout truth, over the images of a dir.

    Returns a DataFrame ImageId, dice_1..dice_4. Raises SteelError for a malformed submission (bad RLE,
    missing or unknown (image, class) rows, duplicates).
    """
    images_dir = Path(images_dir)
    names = list_images(images_dir)
    if not names:
        raise SteelError(f"{images_dir}: no images")
    shape = image_shape(images_dir, names)
    truth_path = Path(truth_csv)
    from steel.labels import _long_format, read_csv

    truth_long = _long_format(read_csv(truth_path), truth_path)
    truth_long = truth_long[truth_long["ImageId"].isin(set(names))]
    truth = build_table(truth_long, names, shape, truth_path, images_dir)

    sub_path = Path(submission)
    sub = read_submission(sub_path)
    unknown = ~sub["ImageId"].isin(set(names))
    if unknown.any():
        r = sub[unknown].iloc[0]
        raise SteelError(f"{sub_path}: line {r['line']}: image {r['ImageId']} is not in {images_dir}")
    expected = len(names) * N_CLASSES
    if len(sub) != expected:
        have = set(zip(sub["ImageId"], sub["ClassId"]))
        missing = next((i, c) for i in names for c in CLASSES if (i, c) not in have)
        raise SteelError(
            f"{sub_path}: {len(sub)} rows, expected {expected}; e.g. no row for image {missing[0]} class {missing[1]}"
        )
    pos = pd.Series(np.arange(len(names)), index=names)
    inter = np.zeros((len(names), N_CLASSES))
    pred_area = np.zeros((len(names), N_CLASSES))
    for r in sub.itertuples(index=False):
        try:
            pm = rle.decode(r.EncodedPixels, shape)
        except ValueError as e:
            raise SteelError(
                f"{sub_path}: line {r.line}: RLE of {r.ImageId} class {r.ClassId} malformed: {e}"
            ) from None
        i, c = pos[r.ImageId], r.ClassId - 1
        tr = truth.at[i, f"rle_{r.ClassId}"]
        tm = rle.decode(tr, shape) if tr else None
        pred_area[i, c] = pm.sum(dtype=np.int64)
        inter[i, c] = 0 if tm is None else (pm & tm).sum(dtype=np.int64)
    true_area = truth[[f"area_{c}" for c in CLASSES]].to_numpy()
    dice = dice_from_counts(inter, pred_area, true_area)
    out = pd.DataFrame(dice, columns=[f"dice_{c}" for c in CLASSES])
    out.insert(0, "ImageId", names)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "submission", help="submission CSV (ImageId,EncodedPixels,ClassId or ImageId_ClassId,EncodedPixels)"
    )
    p.add_argument("--truth", required=True, help="truth CSV in train.csv layout")
    p.add_argument("--images", required=True, help="directory of the images to score over")


def main(args: argparse.Namespace) -> int:
    per_pair = score_submission(args.submission, args.truth, args.images)
    per_class = per_pair[[f"dice_{c}" for c in CLASSES]].mean()
    mean = float(per_class.mean())
    print(f"mean dice {mean:.5f} over {len(per_pair)} images x {N_CLASSES} classes")
    print("  " + "  ".join(f"class {c}: {per_class[f'dice_{c}']:.5f}" for c in CLASSES))
    return 0
