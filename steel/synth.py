"""Synthetic data in the Kaggle layout: train_images/, train.csv, test_images/, sample_submission.csv.

The test truth is written too (``test_truth.csv``, train.csv layout) so submissions can be scored.
Images look like rolled steel (horizontal streaks, noise, brightness drift, sometimes a black margin)
and carry defects of 4 kinds with the real set's class mix and per-class area ranges.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from steel import KAGGLE_SHAPE, N_CLASSES, rle
from steel.errors import SteelError
from steel.io import atomic_path

# Share of defect images whose primary class is c (real set: class 3 dominates, class 2 is rare).
PRIMARY_PROBS = np.array([0.13, 0.035, 0.70, 0.135])
P_DEFECT_FREE = 0.47
P_SECOND_CLASS = 0.11  # of defect images -> ~6 % of all images carry two classes
# Per-class mask area ranges on a 256x1600 image (walkthrough section 4.1, 2-98 percentile).
AREA_RANGES = {1: (500, 15500), 2: (700, 10000), 3: (1100, 160000), 4: (2800, 127000)}


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Rolled-steel texture: streaks along the rolling direction, drift, grain noise. float32 (H, W)."""
    base = rng.uniform(70, 130)
    rows = cv2.GaussianBlur(rng.normal(0, 6, (h, 1)).astype(np.float32), (1, 0), sigmaX=1, sigmaY=2)
    streaks = np.broadcast_to(rows, (h, w)) * rng.uniform(0.5, 1.5)
    x = np.linspace(0, 1, w, dtype=np.float32)
    drift = rng.uniform(-25, 25) * x + rng.uniform(-10, 10) * np.sin(
        2 * np.pi * (x * rng.uniform(0.3, 1.5) + rng.uniform())
    )
    grain = cv2.GaussianBlur(rng.normal(0, 12, (h, w)).astype(np.float32), (0, 0), sigmaX=2.5, sigmaY=0.6)
    img = base + streaks + drift[None, :] + grain + rng.normal(0, 3, (h, w)).astype(np.float32)
    return img.astype(np.float32)


def _blob(rng: np.random.Generator, h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """An irregular filled polygon around (cx, cy) with radii (rx, ry) as a (H, W) uint8 mask."""
    n = 14
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = rng.uniform(0.6, 1.0, n)
    pts = np.stack([cx + rx * rad * np.cos(ang), cy + ry * rad * np.sin(ang)], 1).round().astype(np.int32)
    m = np.zeros((h, w), np.uint8)
    cv2.fillPoly(m, [pts], 1)
    return m


def _defect(
    rng: np.random.Generator, cls: int, h: int, w: int, x0: int, target: float
) -> tuple[np.ndarray, float, bool]:
    """Mask (H, W) uint8, intensity shift and whether the texture is speckled, for one defect of a class."""
    m = np.zeros((h, w), np.uint8)
    if cls == 1:  # clusters of small pits
        cx, cy = rng.uniform(x0 + 0.05 * w, 0.95 * w), rng.uniform(0.1 * h, 0.9 * h)
        k = int(rng.integers(3, 9))
        r = max(1.5, np.sqrt(target / k / np.pi))
        for _ in range(k):
            px, py = cx + rng.normal(0, 3 * r), cy + rng.normal(0, 2 * r)
            cv2.ellipse(
                m,
                (int(px), int(py)),
                (max(1, int(r * rng.uniform(0.7, 1.3))), max(1, int(r * rng.uniform(0.6, 1.1)))),
                rng.uniform(0, 180),
                0,
                360,
                1,
                -1,
            )
        return m, rng.uniform(-55, -25), True
    if cls == 2:  # short vertical scratches across the strip
        length = rng.uniform(0.3, 0.9) * h
        thick = max(2, int(target / length))
        cx, cy = rng.uniform(x0 + 0.05 * w, 0.95 * w), rng.uniform(0.2 * h, 0.8 * h)
        cv2.line(
            m,
            (int(cx), int(cy - length / 2)),
            (int(cx + rng.uniform(-0.1, 0.1) * length), int(cy + length / 2)),
            1,
            thick,
        )
        return m, rng.uniform(25, 50), False
    if cls == 3:  # long scratches / scuffs along the rolling direction
        k = int(rng.integers(1, 4))
        for _ in range(k):
            length = rng.uniform(0.15, 0.8) * (w - x0)
            thick = int(np.clip(target / k / length, 2, 0.5 * h))
            x1 = rng.uniform(x0, w - length)
            y1 = rng.uniform(0.1 * h, 0.9 * h)
            y2 = np.clip(y1 + rng.uniform(-0.3, 0.3) * h, 0, h - 1)
            cv2.line(m, (int(x1), int(y1)), (int(x1 + length), int(y2)), 1, thick)
        return m, rng.choice([-1, 1]) * rng.uniform(14, 32), True
    # class 4: large dark patches
    ry = min(0.45 * h, np.sqrt(target / np.pi / 3))
    rx = target / np.pi / ry
    cx, cy = rng.uniform(x0 + rx, max(x0 + rx + 1, w - rx)), rng.uniform(ry, h - ry)
    return _blob(rng, h, w, cx, cy, rx, ry), rng.uniform(-45, -22), False


def make_image(rng: np.random.Generator, classes: list[int], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image (H, W) uint8 and its (4, H, W) uint8 masks with the given defect classes."""
    img = _background(rng, h, w)
    x0 = 0
    if rng.uniform() < 0.15:  # black margin where the strip ends
        x0 = int(rng.uniform(0.05, 0.35) * w)
        if rng.uniform() < 0.5:
            img = img[:, ::-1].copy()
            x0m = slice(w - x0, w)
        else:
            x0m = slice(0, x0)
        img[:, x0m] = rng.uniform(0, 12, (h, x0)).astype(np.float32)
        x0 = x0 if x0m.start == 0 else 0
    masks = np.zeros((N_CLASSES, h, w), np.uint8)
    for _ in range(rng.poisson(0.6)):  # harmless stains and roll marks: not defects
        stain = _blob(
            rng,
            h,
            w,
            rng.uniform(x0, w),
            rng.uniform(0, h),
            rng.uniform(0.02, 0.15) * w,
            rng.uniform(0.05, 0.3) * h,
        )
        img += cv2.GaussianBlur(stain.astype(np.float32), (0, 0), 6) * rng.uniform(-18, 12)
    scale = h * w / (KAGGLE_SHAPE[0] * KAGGLE_SHAPE[1])
    for cls in classes:
        lo, hi = AREA_RANGES[cls]
        target = np.exp(rng.uniform(np.log(lo), np.log(hi))) * scale
        m, shift, speckled = _defect(rng, cls, h, w, x0, target)
        m &= masks.max(0) == 0  # classes do not overlap
        if x0:
            m[:, :x0] = 0
        soft = cv2.GaussianBlur(m.astype(np.float32), (0, 0), 1.2)
        tex = rng.normal(1.0, 0.45 if speckled else 0.15, (h, w)).astype(np.float32)
        img += soft * shift * tex
        masks[cls - 1] = m
    return np.clip(img, 0, 255).astype(np.uint8), masks


def sample_classes(rng: np.random.Generator) -> list[int]:
    """Defect classes of one image: [] for ~47 %, one class, or (~6 % of images) two."""
    if rng.uniform() < P_DEFECT_FREE:
        return []
    first = int(rng.choice(N_CLASSES, p=PRIMARY_PROBS)) + 1
    if rng.uniform() < P_SECOND_CLASS:
        p = PRIMARY_PROBS.copy()
        p[first - 1] = 0
        return [first, int(rng.choice(N_CLASSES, p=p / p.sum())) + 1]
    return [first]


def _write_split(
    rng: np.random.Generator, out: Path, folder: str, n: int, h: int, w: int, desc: str
) -> pd.DataFrame:
    (out / folder).mkdir(parents=True, exist_ok=True)
    rows = []
    ids = set()
    for _ in tqdm(range(n), desc=desc, unit="img", leave=False, disable=n < 50):
        image_id = f"{int(rng.integers(0, 16**9)):09x}.jpg"
        while image_id in ids:
            image_id = f"{int(rng.integers(0, 16**9)):09x}.jpg"
        ids.add(image_id)
        img, masks = make_image(rng, sample_classes(rng), h, w)
        path = out / folder / image_id
        with atomic_path(path, ".jpg") as tmp:
            if not cv2.imwrite(str(tmp), img, [cv2.IMWRITE_JPEG_QUALITY, 95]):
                raise OSError(f"cannot write {path}")
        for c in range(N_CLASSES):
            if masks[c].any():
                rows.append((image_id, c + 1, rle.encode(masks[c])))
    return pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"])


def synth(
    out: str | os.PathLike,
    n_train: int = 200,
    n_test: int = 50,
    seed: int = 0,
    height: int = KAGGLE_SHAPE[0],
    width: int = KAGGLE_SHAPE[1],
) -> Path:
    """Write a Kaggle-layout synthetic data set to ``out``; deterministic by ``seed``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train = _write_split(rng, out, "train_images", n_train, height, width, "train images")
    test = _write_split(rng, out, "test_images", n_test, height, width, "test images")
    for name, df in (("train.csv", train), ("test_truth.csv", test)):
        with atomic_path(out / name, ".csv") as tmp:
            df.sort_values(["ImageId", "ClassId"]).to_csv(tmp, index=False)
    test_ids = sorted(p.name for p in (out / "test_images").iterdir() if p.suffix == ".jpg")
    sample = pd.DataFrame(
        {
            "ImageId": np.repeat(test_ids, N_CLASSES),
            "EncodedPixels": "1 1",
            "ClassId": np.tile(np.arange(1, N_CLASSES + 1), len(test_ids)),
        }
    )
    with atomic_path(out / "sample_submission.csv", ".csv") as tmp:
        sample.to_csv(tmp, index=False)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="output directory")
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=KAGGLE_SHAPE[0])
    p.add_argument("--width", type=int, default=KAGGLE_SHAPE[1])


def main(args: argparse.Namespace) -> int:
    for name in ("n_train", "n_test", "height", "width"):
        if getattr(args, name) < (0 if name.startswith("n_") else 16):
            raise SteelError(f"--{name.replace('_', '-')} {getattr(args, name)} is too small")
    out = synth(args.dir, args.n_train, args.n_test, args.seed, args.height, args.width)
    print(f"wrote {args.n_train} train + {args.n_test} test images ({args.height}x{args.width}) to {out}")
    return 0
