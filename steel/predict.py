"""``steel predict FILE|DIR --images DIR --out submission.csv``: images -> ensemble -> Kaggle submission.

FILE is a TorchScript file from ``steel export`` (loaded with ``torch.jit.load`` alone: no training code or
config is imported); DIR a run or ensemble dir, run eagerly with the same ``steel.blend.Ensemble`` class the
export scripts. Images are read (grey, OpenCV) by DataLoader workers, batched, predicted (thresholds and
post-processing are inside the ensemble), RLE-encoded per (image, class) ("" where empty), written
atomically and read back with the ``steel score`` validator before the command reports success.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from steel import N_CLASSES, rle
from steel.errors import SteelError
from steel.labels import list_images, write_submission

cv2.setNumThreads(0)


class ImageFolder(Dataset):
    """Grey uint8 images (H, W) of a directory by name; an unreadable file gives None (reported by the caller)."""

    def __init__(self, images_dir: str | os.PathLike, names: list[str]) -> None:
        self.dir, self.names = Path(images_dir), list(names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None]:
        return i, cv2.imread(str(self.dir / self.names[i]), cv2.IMREAD_GRAYSCALE)


def _as_list(items: list) -> list:
    return items


def load_predictor(path: str | os.PathLike, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """(callable uint8 images -> (masks, cls probs, mask probs), manifest) of an exported file or a dir."""
    path = Path(path)
    if path.is_dir():
        from steel.blend import build_ensemble
        from steel.export import manifest_of
        from steel.io import read_json

        ensemble, spec = build_ensemble(path, device)
        return ensemble, manifest_of(spec, read_json(path / "thresholds.json"))
    if not path.is_file():
        raise SteelError(f"{path}: not found (expected a file from `steel export` or a run/ensemble dir)")
    if path.suffix.lower() == ".onnx":
        raise SteelError(
            f"{path}: ONNX exports hold one fold net without TTA/post-processing; predict with a TorchScript export or the dir"
        )
    from steel.export import MANIFEST, quiet_jit

    extra = {MANIFEST: ""}
    try:
        with quiet_jit():
            model = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SteelError(f"{path}: not a TorchScript file from `steel export` ({first[:120]})") from None
    if not extra[MANIFEST]:
        raise SteelError(f"{path}: no {MANIFEST} inside (not made by `steel export`)")
    return model.eval(), json.loads(extra[MANIFEST])


def validate_submission(path: str | os.PathLike, images_dir: str | os.PathLike) -> None:
    """Read a submission back with the ``steel score`` validator (rows for every image x class, known ids,
    well-formed RLE); SteelError if anything is wrong."""
    from steel.metrics import score_submission

    with tempfile.TemporaryDirectory() as tmp:
        empty_truth = Path(tmp) / "truth.csv"
        empty_truth.write_text("ImageId,ClassId,EncodedPixels\n")
        score_submission(path, empty_truth, images_dir)


def predict(
    model_path: str | os.PathLike,
    images_dir: str | os.PathLike,
    out: str | os.PathLike,
    batch_size: int = 8,
    device: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write the submission of every image of ``images_dir``; returns a summary dict."""
    from tqdm import tqdm

    images_dir = Path(images_dir)
    if images_dir.exists() and not images_dir.is_dir():
        raise SteelError(f"{images_dir}: not a directory of images")
    names = list_images(images_dir)
    if not names:
        raise SteelError(f"{images_dir}: no images (.jpg, .jpeg, .png, .bmp)")
    if batch_size < 1:
        raise SteelError(f"--batch-size {batch_size}: must be >= 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SteelError("--device cuda: no CUDA device available")
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if workers < 0:
        raise SteelError(f"--workers {workers}: must be >= 0")
    model, manifest = load_predictor(model_path, device)

    loader = DataLoader(ImageFolder(images_dir, names), batch_size=batch_size, num_workers=workers, collate_fn=_as_list,
                        pin_memory=device.startswith("cuda"))  # fmt: skip
    rles: list[list[str]] = [[""] * N_CLASSES for _ in names]
    positive = np.zeros(N_CLASSES, np.int64)
    shape: tuple[int, int] | None = None
    t0 = time.perf_counter()
    # TorchScript: plain interpretation. The profiling executor re-specialises the big inlined graph per input
    # shape and gains nothing on this conv-bound graph (it cost 3-5x on first batches with a loop-heavy
    # post-processing); eager modules are unaffected
    with (
        torch.jit.optimized_execution(False),
        torch.inference_mode(),
        tqdm(total=len(names), desc="predict", unit="img") as bar,
    ):
        for items in loader:
            idx = [i for i, _ in items]
            imgs = []
            for i, img in items:
                if img is None:
                    raise SteelError(f"{images_dir / names[i]}: cannot read image (corrupt or not an image)")
                if shape is None:
                    shape = img.shape
                    want = manifest.get("image_size")
                    if want and tuple(want) != shape:
                        print(
                            f"predict: warning: images are {shape[0]}x{shape[1]}, the model was tuned on {want[0]}x{want[1]}"
                        )
                elif img.shape != shape:
                    raise SteelError(
                        f"{images_dir / names[i]}: image is {img.shape[0]}x{img.shape[1]}, {names[0]} is {shape[0]}x{shape[1]}; all images need one size"
                    )
                imgs.append(img)
            x = torch.from_numpy(np.stack(imgs)).to(device, non_blocking=True)
            masks = model(x)[0].cpu().numpy()
            positive += masks.any((-2, -1)).sum(0)
            for j, i in enumerate(idx):
                rles[i] = [rle.encode(masks[j, c]) for c in range(N_CLASSES)]
            bar.update(len(idx))
    seconds = time.perf_counter() - t0
    write_submission(names, rles, out)
    validate_submission(out, images_dir)
    per_class = ", ".join(f"{c + 1}: {int(n)}" for c, n in enumerate(positive))
    print(f"predict: {len(names)} images in {seconds:.1f}s ({len(names) / max(seconds, 1e-9):.1f} img/s, {device}); "
          f"images with defects per class {per_class} -> {out} (validated)")  # fmt: skip
    return {"n": len(names), "seconds": seconds, "positive": positive.tolist(), "out": str(out)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", metavar="FILE", help="TorchScript file from `steel export`, or a run/ensemble dir (eager)"
    )
    p.add_argument("--images", required=True, help="directory of test images")
    p.add_argument("--out", required=True, help="submission CSV to write")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="image loading processes (default min(4, CPUs); 0 = main process)",
    )


def main(args: argparse.Namespace) -> int:
    predict(args.model, args.images, args.out, args.batch_size, args.device, args.workers)
    return 0
