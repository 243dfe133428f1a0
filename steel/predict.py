"""``steel predict FILE|DIR --images DIR --out submission.csv``: images -> ensemble -> Kaggle submission.

FILE is a file from ``steel export`` (a ``.pt2`` torch.export archive or AOTInductor package, or ONNX), run
with torch (onnxruntime for ONNX) alone: no training code or config is imported; DIR a run or ensemble dir,
run eagerly (``steel.ensemble.Ensemble``, the same forward the export holds). Images are read by DataLoader
workers (``steel.images.read_grey``: a truncated or corrupt file is one error line naming it; the workers
die with this process, even on SIGKILL), batched, predicted (thresholds and post-processing are inside the
ensemble), RLE-encoded per (image, class) ("" where empty), written to a temp file, read back with the
``steel score`` validator and only then renamed onto ``--out``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from steel import N_CLASSES, rle
from steel.errors import SteelError
from steel.labels import list_images, write_submission


class ImageFolder(Dataset):
    """Grey uint8 images (H, W) of a directory by name; an unreadable file gives its error line instead."""

    def __init__(self, images_dir: str | os.PathLike, names: list[str]) -> None:
        self.dir, self.names = Path(images_dir), list(names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | str]:
        from steel.images import read_grey

        try:
            return i, read_grey(self.dir / self.names[i])
        except SteelError as e:  # raised in the main process, as one line
            return i, str(e)


def _as_list(items: list) -> list:
    return items


def load_predictor(path: str | os.PathLike, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """(callable uint8 images (B, H, W) -> (masks, cls probs, mask probs), manifest) of an exported file or
    a run/ensemble dir."""
    path = Path(path)
    if path.is_dir():
        from steel.blend import build_ensemble
        from steel.export import manifest_of
        from steel.io import read_json

        ensemble, spec = build_ensemble(path, device)
        return ensemble, manifest_of(spec, read_json(path / "thresholds.json"))
    from steel.export import load_exported

    return load_exported(path, device)


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

    from steel.io import atomic_path
    from steel.lifecycle import WorkerInit

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
    exported = not Path(model_path).is_dir()
    from steel.export import MAX_BATCH

    batch_size = min(batch_size, MAX_BATCH) if exported else batch_size

    loader = DataLoader(ImageFolder(images_dir, names), batch_size=batch_size, num_workers=workers, collate_fn=_as_list,
                        pin_memory=device.startswith("cuda"), worker_init_fn=WorkerInit() if workers else None)  # fmt: skip
    rles: list[list[str]] = [[""] * N_CLASSES for _ in names]
    positive = np.zeros(N_CLASSES, np.int64)
    shape: tuple[int, int] | None = None
    want = tuple(manifest.get("image_size") or ())
    t0 = time.perf_counter()
    with torch.inference_mode(), tqdm(total=len(names), desc="predict", unit="img") as bar:
        for items in loader:
            idx = [i for i, _ in items]
            imgs = []
            for i, img in items:
                if isinstance(img, str):
                    raise SteelError(img)
                if shape is None:
                    shape = img.shape
                    if want and want != shape and exported:
                        raise SteelError(
                            f"{images_dir / names[i]}: image is {shape[0]}x{shape[1]}, {model_path} was exported for "
                            f"{want[0]}x{want[1]} images"
                        )
                    if want and want != shape:
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
    with atomic_path(out, ".csv") as tmp:  # validated before it is renamed into place
        write_submission(names, rles, tmp)
        validate_submission(tmp, images_dir)
    per_class = ", ".join(f"{c + 1}: {int(n)}" for c, n in enumerate(positive))
    print(f"predict: {len(names)} images in {seconds:.1f}s ({len(names) / max(seconds, 1e-9):.1f} img/s, {device}); "
          f"images with defects per class {per_class} -> {out} (validated)")  # fmt: skip
    return {"n": len(names), "seconds": seconds, "positive": positive.tolist(), "out": str(out)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="FILE",
        help="file from `steel export` (.pt2 or .onnx), or a run/ensemble dir (eager)",
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
