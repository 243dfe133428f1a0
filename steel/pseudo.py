"""``steel pseudo SOURCE --images DIR --out PSEUDO_DIR``: confident test predictions -> a pseudo-label train set.

SOURCE is anything ``steel.predict.load_predictor`` runs: a file from ``steel export`` or a run/ensemble dir.
Its outputs per image (masks after the tuned post-processing, class probabilities, mask probabilities) are
all this module reads, so it works the same for every gating mode of the decision rule.

The rule (1st place, after Heng): class c of an image is *confident* when the classifier is sure and the
segmentation agrees:
  positive  cls_c > hi_c,  the post-processed mask of c is not empty and the mask head alone (mask probability
            >= seg_pixel_c) covers >= max(1, seg_min_area_c) pixels;
  negative  cls_c < lo_c,  the post-processed mask is empty and the mask head alone covers fewer pixels.
An image is kept when all four classes are confident; its labels are the post-processed masks (empty for the
negatives). Defaults: hi 0.95, lo 0.05, seg_pixel / seg_min_area the tuned pixel threshold / min-area of the
source's thresholds (0.5 / 0 without them). Cut-offs can be given per class ("0.9,0.95,0.95,0.9").

PSEUDO_DIR (written atomically) is a Kaggle-layout data dir: train.csv (ImageId,ClassId,EncodedPixels, rows for
the kept defects only), train_images/ (hard links or copies of the kept images), manifest.csv (every image:
kept, why, class probabilities, mask and mask-head areas) and pseudo.json (source, cut-offs, counts).
``data.pseudo_dir`` / ``data.pseudo_share`` of ``steel.data.SteelDataModule`` add its images to the training
epochs of every fold (``mix_pseudo``); validation and the OOF never see them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from steel import N_CLASSES, rle
from steel.errors import SteelError
from steel.io import atomic_dir, write_json

DEFAULT_HI, DEFAULT_LO = 0.95, 0.05
MANIFEST_CSV, SUMMARY_JSON = "manifest.csv", "pseudo.json"
LAYOUT = ("train.csv", "train_images", MANIFEST_CSV, SUMMARY_JSON)


def parse_per_class(spec: str | float | list[float] | None, name: str, default: float) -> np.ndarray:
    """'0.95' or '0.9,0.95,0.95,0.9' (or a number / list) -> float64 (4,); SteelError for other shapes."""
    if spec is None:
        return np.full(N_CLASSES, float(default))
    try:
        vals = [float(v) for v in spec.split(",")] if isinstance(spec, str) else np.atleast_1d(spec).tolist()
        vals = [float(v) for v in vals]
    except ValueError:
        raise SteelError(f"--{name} {spec!r}: expected a number or 4 comma-separated numbers") from None
    if len(vals) == 1:
        vals = vals * N_CLASSES
    if len(vals) != N_CLASSES or not all(np.isfinite(vals)):
        raise SteelError(f"--{name} {spec!r}: expected one number or {N_CLASSES} (one per class)")
    return np.asarray(vals, dtype=np.float64)


def decide(
    cls: np.ndarray,
    mask_area: np.ndarray,
    seg_area: np.ndarray,
    hi: np.ndarray,
    lo: np.ndarray,
    seg_min_area: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The keep rule (module docstring) on per-image arrays (N, 4): class probs, post-processed mask areas and
    mask-head areas -> (kept bool (N,), positive bool (N, 4), reason per image)."""
    cls, mask_area, seg_area = np.asarray(cls, np.float64), np.asarray(mask_area), np.asarray(seg_area)
    need = np.maximum(np.asarray(seg_min_area, np.float64), 1.0)[None, :]
    pos = (cls > hi[None, :]) & (mask_area > 0) & (seg_area >= need)
    neg = (cls < lo[None, :]) & (mask_area == 0) & (seg_area < need)
    kept = (pos | neg).all(1)
    reasons = []
    for i in range(len(cls)):  # one string per image
        if kept[i]:
            k = np.flatnonzero(pos[i]) + 1
            reasons.append("kept: " + (f"defects {','.join(map(str, k))}" if len(k) else "defect-free"))
            continue
        c = int(np.flatnonzero(~(pos[i] | neg[i]))[0])
        p, a, s = cls[i, c], int(mask_area[i, c]), int(seg_area[i, c])
        if lo[c] <= p <= hi[c]:
            why = f"classifier {p:.3f} between the cut-offs {lo[c]:g} and {hi[c]:g}"
        elif p > hi[c]:
            why = f"classifier {p:.3f} > {hi[c]:g} but mask {a} px, mask head {s} px"
        else:
            why = f"classifier {p:.3f} < {lo[c]:g} but mask {a} px, mask head {s} px"
        reasons.append(f"class {c + 1}: {why}")
    return kept, pos, reasons


def _thresholds(manifest: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(pixel, min_area) per class of the source's thresholds (0.5 / 0 when it has none)."""
    th = (manifest or {}).get("thresholds") or {}
    classes = th.get("classes") or {}
    pixel = [float((classes.get(str(c)) or {}).get("pixel", 0.5)) for c in range(1, N_CLASSES + 1)]
    area = [float((classes.get(str(c)) or {}).get("min_area", 0.0)) for c in range(1, N_CLASSES + 1)]
    return np.asarray(pixel), np.asarray(area)


def _check_out(out: Path, images_dir: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SteelError(f"{out}: is a file, expected a directory for the pseudo labels")
    if out.resolve() == images_dir.resolve() or images_dir.resolve().is_relative_to(out.resolve()):
        raise SteelError(f"--out {out}: would replace the image directory {images_dir}")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [e for e in entries if e not in LAYOUT]
    if foreign or (entries and SUMMARY_JSON not in entries):
        name = foreign[0] if foreign else entries[0]
        raise SteelError(
            f"{out / name}: {out} holds something other than `steel pseudo` output; choose another --out"
        )


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


def pseudo(
    source: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    hi: str | float | None = None,
    lo: str | float | None = None,
    seg_pixel: str | float | None = None,
    seg_min_area: str | float | None = None,
    batch_size: int = 8,
    device: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Predict every image of ``images`` with ``source``, keep the confident ones, write PSEUDO_DIR ``out``;
    returns the summary written to pseudo.json."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from steel.labels import list_images
    from steel.lifecycle import WorkerInit
    from steel.predict import ImageFolder, load_predictor

    images, out = Path(images), Path(out)
    names = list_images(images)
    if not names:
        raise SteelError(f"{images}: no images (.jpg, .jpeg, .png, .bmp)")
    if batch_size < 1:
        raise SteelError(f"--batch-size {batch_size}: must be >= 1")
    if workers is not None and workers < 0:
        raise SteelError(f"--workers {workers}: must be >= 0")
    _check_out(out, images)
    hi_c, lo_c = parse_per_class(hi, "hi", DEFAULT_HI), parse_per_class(lo, "lo", DEFAULT_LO)
    if ((hi_c < 0) | (hi_c > 1) | (lo_c < 0) | (lo_c > 1) | (lo_c > hi_c)).any():
        raise SteelError(f"--lo {lo_c.tolist()} / --hi {hi_c.tolist()}: need 0 <= lo <= hi <= 1 per class")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SteelError(f"--device {device}: no CUDA device available")
    model, manifest = load_predictor(source, device)
    exported = not Path(source).is_dir()
    if exported:  # an export takes batches of 1 .. MAX_BATCH images of the size it was exported for
        from steel.export import MAX_BATCH

        batch_size = min(batch_size, MAX_BATCH)
    want = tuple(manifest.get("image_size") or ()) if exported else ()
    tuned_pixel, tuned_area = _thresholds(manifest)
    pix = parse_per_class(seg_pixel, "seg-pixel", 0.5) if seg_pixel is not None else tuned_pixel
    area = parse_per_class(seg_min_area, "seg-min-area", 0) if seg_min_area is not None else tuned_area

    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    loader = DataLoader(ImageFolder(images, names), batch_size=batch_size, num_workers=workers, collate_fn=list,
                        worker_init_fn=WorkerInit() if workers else None)  # fmt: skip
    n = len(names)
    cls_all = np.zeros((n, N_CLASSES), np.float32)
    mask_area = np.zeros((n, N_CLASSES), np.int64)
    seg_area = np.zeros((n, N_CLASSES), np.int64)
    rles: list[list[str]] = [[""] * N_CLASSES for _ in names]
    shape: tuple[int, int] | None = None
    thr = torch.as_tensor(pix, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    t0 = time.perf_counter()
    with torch.inference_mode(), tqdm(total=n, desc="pseudo", unit="img") as bar:
        for items in loader:
            idx = [i for i, _ in items]
            for i, img in items:
                if isinstance(img, str):  # ImageFolder's one-line error of an unreadable file (names it)
                    raise SteelError(img)
                if shape is None and want and tuple(img.shape) != want:
                    raise SteelError(
                        f"{images / names[i]}: image is {img.shape[0]}x{img.shape[1]}, {source} was exported for "
                        f"{want[0]}x{want[1]} images"
                    )
                shape = shape or img.shape
                if img.shape != shape:
                    raise SteelError(
                        f"{images / names[i]}: image is {img.shape[0]}x{img.shape[1]}, {names[0]} is {shape[0]}x{shape[1]}"
                    )
            x = torch.from_numpy(np.stack([img for _, img in items])).to(device)
            masks, cls, probs = model(x)
            masks = masks.bool()
            cls_all[idx] = cls.float().cpu().numpy()
            mask_area[idx] = masks.sum((-2, -1)).cpu().numpy()
            seg_area[idx] = (probs.float() >= thr).sum((-2, -1)).cpu().numpy()
            m = masks.cpu().numpy()
            for j, i in enumerate(idx):
                rles[i] = [rle.encode(m[j, c]) for c in range(N_CLASSES)]
            bar.update(len(idx))
    seconds = time.perf_counter() - t0
    kept, positive, reasons = decide(cls_all, mask_area, seg_area, hi_c, lo_c, area)

    table = pd.DataFrame({"ImageId": names, "kept": kept, "reason": reasons})
    for c in range(N_CLASSES):
        table[f"cls_{c + 1}"] = cls_all[:, c].round(5)
        table[f"mask_area_{c + 1}"] = mask_area[:, c]
        table[f"head_area_{c + 1}"] = seg_area[:, c]
    rows = [
        (names[i], c + 1, rles[i][c])
        for i in np.flatnonzero(kept)
        for c in range(N_CLASSES)
        if positive[i, c]
    ]
    summary = {
        "source": str(Path(source).resolve()),
        "images": str(images.resolve()),
        "n_images": n,
        "n_kept": int(kept.sum()),
        "kept_defect_free": int((kept & ~positive.any(1)).sum()),
        "kept_with_class": {str(c + 1): int((kept & positive[:, c]).sum()) for c in range(N_CLASSES)},
        "hi": hi_c.tolist(),
        "lo": lo_c.tolist(),
        "seg_pixel": pix.tolist(),
        "seg_min_area": area.tolist(),
        "source_mode": ((manifest or {}).get("thresholds") or {}).get("mode"),
        "image_size": list(shape) if shape else None,
        "seconds": round(seconds, 2),
    }
    with atomic_dir(out) as tmp:
        (tmp / "train_images").mkdir()
        for i in np.flatnonzero(kept):
            _link(images / names[i], tmp / "train_images" / names[i])
        pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"]).to_csv(
            tmp / "train.csv", index=False
        )
        table.to_csv(tmp / MANIFEST_CSV, index=False)
        write_json(tmp / SUMMARY_JSON, summary)
    per_class = ", ".join(f"{c}: {k}" for c, k in summary["kept_with_class"].items())
    print(f"pseudo: kept {summary['n_kept']} of {n} images ({summary['kept_defect_free']} defect-free; "
          f"with class {per_class}) in {seconds:.1f}s -> {out}")  # fmt: skip
    return summary


# ---- training side: SteelDataModule(pseudo_dir=..., pseudo_share=...) ----------------------------------------
class PseudoMixSampler:
    """Each epoch: the fold's own order (``base`` sampler over indices 0..n-1, or a fresh permutation of them)
    with k = round(share / (1 - share) * len(own order)) pseudo items (indices n..n+n_pseudo-1, each once before any repeats)
    inserted at random places, so ``share`` of the epoch's items are pseudo-labelled. Same order on every DDP
    rank (seeded by (seed, epoch))."""

    def __init__(self, base: Any, n: int, n_pseudo: int, share: float, seed: int = 0) -> None:
        self.base, self.n, self.n_pseudo, self.seed, self.epoch = base, n, n_pseudo, seed, 0
        self.n_own = len(base) if base is not None else n  # e.g. the negatives sampler draws fewer than n
        self.k = int(round(share / (1.0 - share) * self.n_own)) if n_pseudo else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return self.n_own + self.k

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        self.epoch += 1
        own = np.fromiter(iter(self.base), np.int64) if self.base is not None else rng.permutation(self.n)
        reps = -(-self.k // max(self.n_pseudo, 1))
        extra = (
            self.n + np.concatenate([rng.permutation(self.n_pseudo) for _ in range(reps)] or [[]])[: self.k]
        )
        total = len(own) + self.k
        at = np.zeros(total, bool)
        at[rng.choice(total, self.k, replace=False)] = True
        order = np.empty(total, np.int64)
        order[at], order[~at] = extra.astype(np.int64), own
        return iter(order.tolist())


def mix_pseudo(train_set: Any, sampler: Any, pseudo_dir: str | os.PathLike, share: float,
               exclude: set[str], seed: int = 0) -> tuple[Any, PseudoMixSampler]:  # fmt: skip
    """(fold training set + the pseudo images of ``pseudo_dir`` as a dataset of the same kind and transform,
    a ``PseudoMixSampler``). SteelError if the dir is not usable, ``share`` is outside (0, 1), an image size
    differs, or a pseudo image is one of ``exclude`` (the fold's train/validation ids: never scored on)."""
    from torch.utils.data import ConcatDataset

    from steel.labels import read_train

    pseudo_dir = Path(pseudo_dir)
    if not 0.0 < share < 1.0:
        raise SteelError(f"data.pseudo_share {share}: must be in (0, 1)")
    if not (pseudo_dir / "train.csv").is_file():
        raise SteelError(f"data.pseudo_dir {pseudo_dir}: no train.csv (make it with `steel pseudo`)")
    table = read_train(pseudo_dir)
    if table.empty:
        raise SteelError(f"data.pseudo_dir {pseudo_dir}: no images in {pseudo_dir / 'train_images'}")
    clash = sorted(set(table["ImageId"]) & set(exclude))
    if clash:
        raise SteelError(
            f"{pseudo_dir / 'train_images' / clash[0]}: also an image of the training data ({len(clash)} such); "
            "pseudo labels must come from other images"
        )
    want = tuple(train_set.shape) if train_set.shape is not None else None
    if want is not None and tuple(table.attrs["shape"]) != want:
        h, w = table.attrs["shape"]
        raise SteelError(
            f"data.pseudo_dir {pseudo_dir}: images are {h}x{w}, the training images {want[0]}x{want[1]}"
        )
    extra = type(train_set)(pseudo_dir / "train_images", table, transform=train_set.transform)
    mixed = PseudoMixSampler(sampler, len(train_set), len(extra), share, seed)
    return ConcatDataset([train_set, extra]), mixed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="file from `steel export`, or a run/ensemble dir")
    p.add_argument("--images", required=True, help="directory of (test) images to pseudo-label")
    p.add_argument(
        "--out", required=True, help="PSEUDO_DIR to write (train.csv, train_images/, manifest.csv)"
    )
    p.add_argument("--hi", default=None, help=f"keep a class as present above this classifier probability "
                   f"(one number or 4; default {DEFAULT_HI})")  # fmt: skip
    p.add_argument("--lo", default=None, help=f"keep a class as absent below this classifier probability "
                   f"(default {DEFAULT_LO})")  # fmt: skip
    p.add_argument(
        "--seg-pixel", default=None, help="mask-head pixel threshold (default: the source's tuned one)"
    )
    p.add_argument(
        "--seg-min-area", default=None, help="mask-head min area in pixels (default: the tuned min-area)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--workers", type=int, default=None, help="image loading processes (0 = main process)")


def main(args: argparse.Namespace) -> int:
    pseudo(args.source, args.images, args.out, args.hi, args.lo, args.seg_pixel, args.seg_min_area,
           args.batch_size, args.device, args.workers)  # fmt: skip
    return 0
