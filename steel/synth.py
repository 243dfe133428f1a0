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
from steel.io import atomic_dir

# Share of defect images whose primary class is c (real set: class 3 dominates, class 2 is rare).
PRIMARY_PROBS = np.array([0.13, 0.035, 0.70, 0.135])
# ``--class-mix``: real (the Kaggle mix above) or balanced (each class primary in a quarter of the defect images:
# small demos then hold enough images of the rare classes to learn them)
CLASS_MIXES = {"real": PRIMARY_PROBS, "balanced": np.full(N_CLASSES, 1.0 / N_CLASSES)}
P_DEFECT_FREE = 0.47
P_SECOND_CLASS = 0.11  # of defect images -> ~6 % of all images carry two classes
# Per-class mask area ranges on a 256x1600 image (walkthrough section 4.1, 2-98 percentile).
AREA_RANGES = {1: (500, 15500), 2: (700, 10000), 3: (1100, 160000), 4: (2800, 127000)}
# Test-set domain shifts (``--shift``, for adversarial validation): brightness = +24 grey levels,
# texture = extra fine grain (N(0, 9) noise, blurred along the rows). Drawn from their own RNG stream.
SHIFTS = ("none", "brightness", "texture")
# What `steel synth` writes into its directory (all that --overwrite may replace).
LAYOUT = ("train_images", "test_images", "train.csv", "test_truth.csv", "sample_submission.csv")


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


def sample_classes(rng: np.random.Generator, probs: np.ndarray = PRIMARY_PROBS) -> list[int]:
    """Defect classes of one image: [] for ~47 %, one class (drawn by ``probs``), or (~6 % of images) two."""
    if rng.uniform() < P_DEFECT_FREE:
        return []
    first = int(rng.choice(N_CLASSES, p=probs)) + 1
    if rng.uniform() < P_SECOND_CLASS:
        p = np.array(probs, dtype=np.float64)
        p[first - 1] = 0
        return [first, int(rng.choice(N_CLASSES, p=p / p.sum())) + 1]
    return [first]


def shift_image(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W) image with the test-set shift ``kind`` (``SHIFTS``) applied."""
    if kind == "brightness":
        return np.clip(img.astype(np.int16) + 24, 0, 255).astype(np.uint8)
    if kind == "texture":
        grain = cv2.GaussianBlur(
            rng.normal(0, 9, img.shape).astype(np.float32), (0, 0), sigmaX=1.0, sigmaY=0.4
        )
        return np.clip(img + grain, 0, 255).astype(np.uint8)
    return img


def _write_split(
    rng: np.random.Generator, out: Path, folder: str, n: int, h: int, w: int, desc: str,
    shift: tuple[str, np.random.Generator] | None = None, probs: np.ndarray = PRIMARY_PROBS,
) -> pd.DataFrame:  # fmt: skip
    (out / folder).mkdir(parents=True, exist_ok=True)
    rows = []
    ids = set()
    for _ in tqdm(range(n), desc=desc, unit="img", leave=False, disable=n < 50):
        image_id = f"{int(rng.integers(0, 16**9)):09x}.jpg"
        while image_id in ids:
            image_id = f"{int(rng.integers(0, 16**9)):09x}.jpg"
        ids.add(image_id)
        img, masks = make_image(rng, sample_classes(rng, probs), h, w)
        if shift is not None:
            img = shift_image(img, *shift)
        path = out / folder / image_id  # inside the data set's temporary dir: no per-file temp needed
        if not cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 95]):
            raise OSError(f"cannot write {path}")
        for c in range(N_CLASSES):
            if masks[c].any():
                rows.append((image_id, c + 1, rle.encode(masks[c])))
    return pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"])


def _check_out(out: Path, overwrite: bool) -> None:
    """SteelError unless ``out`` is missing, an empty dir, or (``overwrite``) a dir holding only a data set
    of this layout: a new data set never mixes with old images, and --overwrite deletes nothing else."""
    if out.exists() and not out.is_dir():
        raise SteelError(f"{out}: is a file, expected a directory to write the data set into")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise SteelError(
            f"{out}: holds data already ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); "
            "add --overwrite to replace it, or choose an empty directory"
        )
    foreign = [e for e in entries if e not in LAYOUT]
    if foreign:
        raise SteelError(
            f"{out / foreign[0]}: not part of a steel synth data set, so --overwrite leaves {out} alone; "
            "remove it or choose another directory"
        )


def synth(
    out: str | os.PathLike,
    n_train: int = 200,
    n_test: int = 50,
    seed: int = 0,
    height: int = KAGGLE_SHAPE[0],
    width: int = KAGGLE_SHAPE[1],
    overwrite: bool = False,
    shift: str = "none",
    class_mix: str = "real",
) -> Path:
    """Write a Kaggle-layout synthetic data set to ``out``; deterministic by ``seed``.

    The set is built in a temporary dir beside ``out`` that then replaces it whole, so ``out`` holds either
    the old data set or the new one. SteelError if ``out`` is a file or already holds data (unless
    ``overwrite`` and it holds nothing but a data set of this layout). ``shift``: a domain shift of the test
    images only (``SHIFTS``); the images and masks are otherwise those of ``shift="none"``. ``class_mix``:
    ``CLASS_MIXES`` key, the primary-class mix of the defect images (train and test alike).
    """
    out = Path(out)
    _check_out(out, overwrite)
    if shift not in SHIFTS:
        raise SteelError(f"--shift {shift!r}: choose one of {', '.join(SHIFTS)}")
    if class_mix not in CLASS_MIXES:
        raise SteelError(f"--class-mix {class_mix!r}: choose one of {', '.join(CLASS_MIXES)}")
    probs = CLASS_MIXES[class_mix]
    rng = np.random.default_rng(seed)
    with atomic_dir(out) as tmp:
        train = _write_split(rng, tmp, "train_images", n_train, height, width, "train images", None, probs)
        test_shift = (shift, np.random.default_rng([seed, 1])) if shift != "none" else None
        test = _write_split(rng, tmp, "test_images", n_test, height, width, "test images", test_shift, probs)
        for name, df in (("train.csv", train), ("test_truth.csv", test)):
            df.sort_values(["ImageId", "ClassId"]).to_csv(tmp / name, index=False)
        test_ids = sorted(p.name for p in (tmp / "test_images").iterdir() if p.suffix == ".jpg")
        sample = pd.DataFrame(
            {
                "ImageId": np.repeat(test_ids, N_CLASSES),
                "EncodedPixels": "1 1",
                "ClassId": np.tile(np.arange(1, N_CLASSES + 1), len(test_ids)),
            }
        )
        sample.to_csv(tmp / "sample_submission.csv", index=False)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="output directory")
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=KAGGLE_SHAPE[0])
    p.add_argument("--width", type=int, default=KAGGLE_SHAPE[1])
    p.add_argument(
        "--overwrite", action="store_true", help="replace the data set that DIR holds (nothing else in DIR)"
    )
    p.add_argument("--shift", choices=SHIFTS, default="none", help="domain shift of the test images only")
    p.add_argument("--class-mix", choices=list(CLASS_MIXES), default="real",
                   help="defect class mix: real (Kaggle's, class 3 dominates) or balanced")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    for name in ("n_train", "n_test", "height", "width"):
        if getattr(args, name) < (0 if name.startswith("n_") else 16):
            raise SteelError(f"--{name.replace('_', '-')} {getattr(args, name)} is too small")
    out = synth(args.dir, args.n_train, args.n_test, args.seed, args.height, args.width, args.overwrite,
                args.shift, args.class_mix)  # fmt: skip
    print(f"wrote {args.n_train} train + {args.n_test} test images ({args.height}x{args.width}) to {out}")
    return 0


# ---- synthetic OOF stores (tests and benchmarks of the threshold sweep) ------------------------------------
def _smooth(rng: np.random.Generator, b: int, h: int, w: int, cell: int) -> np.ndarray:
    """b smooth random fields (b, h, w) float32: N(0, 1) on a grid of ``cell`` pixels, bilinear upsampled."""
    gh, gw = max(2, -(-h // cell) + 1), max(2, -(-w // cell) + 1)
    small = rng.standard_normal((gh, gw, b), dtype=np.float32)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(big.reshape(h, w, b).transpose(2, 0, 1))


def _thin_lines(
    rng: np.random.Generator, logit: np.ndarray, truth: np.ndarray, present: np.ndarray, p_lines: float
) -> None:
    """Draw 1-px vertical scratches (as class 2 has) into logit / truth (b, h, w) in place.

    An image where the class is present gets 1-3 true lines with a broken high-probability trace (one pixel
    wide, neighbours spilling a little); an absent one may get a faint false line.
    """
    b, h, w = logit.shape
    for i in range(b):
        true_line = present[i] and rng.random() < p_lines
        n = int(rng.integers(1, 4)) if true_line else int(rng.random() < 0.5 * p_lines)
        if true_line:  # the scratches replace the blobs of this image's class
            truth[i] = 0
            logit[i] = np.minimum(logit[i], -6.0)
        for _ in range(n):
            line = np.zeros((h, w), np.uint8)
            length = rng.uniform(0.2, 0.9) * h
            x, y = rng.uniform(0, w - 1), rng.uniform(0, h - length)
            dx = rng.uniform(-0.02, 0.02) * length
            cv2.line(line, (int(x), int(y)), (int(np.clip(x + dx, 0, w - 1)), int(y + length)), 1, 1)
            on = line.astype(bool)
            spill = cv2.dilate(line, np.ones((1, 3), np.uint8)).astype(bool) & ~on
            trace = cv2.GaussianBlur(
                rng.standard_normal((h, 1)).astype(np.float32), (1, 0), sigmaX=1, sigmaY=2
            )
            trace = np.broadcast_to(4.0 * trace, (h, w))  # ~N(0, 1.5) along the line: gaps and bulges
            if true_line:
                truth[i][on] = 1
                logit[i][on] = np.maximum(logit[i][on], 1.5 + trace[on])
                logit[i][spill] = np.maximum(logit[i][spill], -1.5 + trace[spill])
            else:
                logit[i][on] = np.maximum(logit[i][on], -1.0 + trace[on])


def write_synthetic_oof(
    oof_dir: str | os.PathLike,
    n: int,
    height: int = 256,
    width: int = 1600,
    stride: int = 2,
    n_folds: int = 5,
    seed: int = 0,
    chunk: int = 64,
    progress: bool = False,
    full_res: bool = False,
    thin_lines: float = 0.0,
    timid: float = 0.0,
) -> Path:
    """A random but structured OOF store for tests and benchmarks -> the oof dir.

    Blobs of truth with noisy probabilities around them, false-positive blobs and specks, classifier
    probabilities correlated with presence. ``full_res``: the maps are drawn at (height, width) and the
    store's writer takes every ``stride``-th pixel, so stores of one seed at different strides hold the same
    maps (else they are drawn at the strided size: faster). ``thin_lines``: share of class-2 images whose
    defects are 1-px vertical scratches (also faint false lines), as in the Kaggle set. ``timid``: the mask
    logits are shifted by ``-timid * (cls - 0.5)``, a segmenter that is the less sure the surer the classifier
    is (scaled gating's case: the best pixel threshold falls with the class probability); 0 leaves them.
    """
    from steel.oof import OOFWriter, strided_shape

    rng = np.random.default_rng(seed)
    h, w = (height, width) if full_res else strided_shape(height, width, stride)
    ids = [f"{i:06d}.jpg" for i in range(n)]
    folds = rng.permutation(np.arange(n) % n_folds)
    present_p = np.array([0.12, 0.05, 0.45, 0.12])
    if thin_lines:
        present_p[1] = 0.15
    cells = [max(2, h // k) for k in (16, 16, 8, 5)]
    meta = {"synthetic": True, "seed": seed, "full_res": full_res, "thin_lines": thin_lines}
    with OOFWriter(oof_dir, ids, folds, height, width, stride, meta=meta) as wr:
        for a in tqdm(range(0, n, chunk), desc="synthetic OOF", disable=not progress, dynamic_ncols=True):
            b = min(n, a + chunk) - a
            present = rng.random((b, N_CLASSES)) < present_p
            logits: list[np.ndarray] = []
            truth = np.empty((b, N_CLASSES, h, w), np.uint8)
            for c in range(N_CLASSES):
                field = _smooth(rng, b, h, w, cells[c])
                noise = _smooth(rng, b, h, w, max(1, cells[c] // 4))
                pres = present[:, c, None, None]
                truth[:, c] = pres & (field > 0.8)
                # absent class: a damped field (false-positive blobs and specks), or a clean map (60 %)
                clean = (rng.random(b) < 0.6)[:, None, None]
                logit = (
                    np.where(pres, 5.0 * (field - 0.8), 5.0 * (0.6 * field - 0.8) - 2.5 - 6.0 * clean) + noise
                )
                if c == 1 and thin_lines:
                    _thin_lines(rng, logit, truth[:, c], present[:, c], thin_lines)
                logits.append(logit)
            cls = 1.0 / (1.0 + np.exp(-(np.where(present, 2.0, -2.0) + rng.normal(0.0, 1.5, (b, N_CLASSES)))))
            logit = np.stack(logits, 1)
            if timid:
                logit = logit - (timid * (cls - 0.5))[:, :, None, None].astype(logit.dtype)
            masks = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
            wr.write(np.arange(a, a + b), cls, masks, truth)
    return Path(oof_dir)
