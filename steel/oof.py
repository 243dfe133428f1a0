"""Out-of-fold (OOF) store: every train image once, scored by the fold model that did not train on it.

Layout of ``RUN_DIR/oof/`` (written into a temporary directory, renamed into place when complete):
``index.csv`` (ImageId, fold, row), ``cls.npy`` float32 (N, 4), ``masks.npy`` uint8 (N, 4, h, w) mask
probabilities quantised to round(p * 255) at a stride (``[::stride, ::stride]`` of the full map),
``truth.npy`` uint8 (N, 4, h, w) 0/1, ``meta.json``. Arrays are .npy files opened memory-mapped, so
neither writing nor reading needs the whole set in RAM.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from steel import N_CLASSES
from steel.errors import SteelError
from steel.io import read_json, write_json


def strided_shape(height: int, width: int, stride: int) -> tuple[int, int]:
    """(h, w) of a (height, width) map taken at ``[::stride, ::stride]``."""
    return -(-height // stride), -(-width // stride)


def quantise(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 round(p * 255)."""
    return np.rint(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)


class OOFWriter:
    """Streams OOF rows into memory-mapped arrays; ``close`` makes the store visible atomically."""

    def __init__(
        self,
        oof_dir: str | os.PathLike,
        ids: list[str],
        folds: np.ndarray | list[int],
        height: int,
        width: int,
        stride: int = 1,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if stride < 1:
            raise SteelError(f"stride {stride} must be >= 1")
        self.oof_dir = Path(oof_dir)
        self.oof_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.oof_dir.with_name(f".{self.oof_dir.name}.partial")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.ids, self.folds = list(ids), np.asarray(folds, dtype=np.int64)
        self.height, self.width, self.stride = int(height), int(width), int(stride)
        h, w = strided_shape(self.height, self.width, self.stride)
        n = len(self.ids)
        self.cls = np.lib.format.open_memmap(self.tmp / "cls.npy", "w+", np.float32, (n, N_CLASSES))
        self.masks = np.lib.format.open_memmap(self.tmp / "masks.npy", "w+", np.uint8, (n, N_CLASSES, h, w))
        self.truth = np.lib.format.open_memmap(self.tmp / "truth.npy", "w+", np.uint8, (n, N_CLASSES, h, w))
        self.written = np.zeros(n, dtype=bool)
        self.meta = dict(meta or {})

    def _stride(self, a: np.ndarray) -> np.ndarray:
        if a.shape[-2:] == (self.height, self.width) and self.stride > 1:
            return a[..., :: self.stride, :: self.stride]
        return a

    def write(self, rows: np.ndarray, cls: np.ndarray, masks_prob: np.ndarray, truth: np.ndarray) -> None:
        """Store rows: cls (B, 4) probs, masks_prob (B, 4, H, W) in [0, 1] (full-res or strided), truth 0/1."""
        rows = np.asarray(rows, dtype=np.int64)
        self.cls[rows] = np.asarray(cls, dtype=np.float32)
        self.masks[rows] = quantise(self._stride(np.asarray(masks_prob)))
        self.truth[rows] = self._stride(np.asarray(truth)) != 0
        self.written[rows] = True

    def close(self) -> Path:
        """Flush, check every row was written, write index + meta and move the store into place."""
        if not self.written.all():
            missing = [self.ids[i] for i in np.flatnonzero(~self.written)[:3]]
            raise RuntimeError(f"OOF store incomplete: {int((~self.written).sum())} images not written, e.g. {missing}")
        for a in (self.cls, self.masks, self.truth):
            a.flush()
        del self.cls, self.masks, self.truth
        pd.DataFrame({"ImageId": self.ids, "fold": self.folds, "row": np.arange(len(self.ids))}).to_csv(
            self.tmp / "index.csv", index=False
        )
        meta = {"stride": self.stride, "height": self.height, "width": self.width, "n": len(self.ids), "classes": N_CLASSES}
        write_json(self.tmp / "meta.json", {**self.meta, **meta})
        old = self.oof_dir.with_name(f".{self.oof_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.oof_dir.exists():
            os.replace(self.oof_dir, old)
        os.replace(self.tmp, self.oof_dir)
        shutil.rmtree(old, ignore_errors=True)
        return self.oof_dir

    def abort(self) -> None:
        """Drop the partial store."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> OOFWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class OOFStore:
    """Read-only, memory-mapped view of an OOF store (a run dir, an ensemble dir or the oof/ dir itself)."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self.dir = path if (path / "meta.json").is_file() else path / "oof"
        if not (self.dir / "meta.json").is_file():
            raise SteelError(f"{path}: no OOF store (expected {self.dir}/meta.json; run `steel oof` first)")
        self.meta: dict[str, Any] = read_json(self.dir / "meta.json")
        index = pd.read_csv(self.dir / "index.csv")
        self.ids: list[str] = index["ImageId"].tolist()
        self.folds: np.ndarray = index["fold"].to_numpy()
        self.stride: int = int(self.meta["stride"])
        self.height: int = int(self.meta["height"])
        self.width: int = int(self.meta["width"])
        self.cls: np.ndarray = np.load(self.dir / "cls.npy", mmap_mode="r")
        self.masks: np.ndarray = np.load(self.dir / "masks.npy", mmap_mode="r")
        self.truth: np.ndarray = np.load(self.dir / "truth.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.ids)

    def probs(self, i: int) -> np.ndarray:
        """Mask probabilities of row i as float32 (4, h, w) in [0, 1]."""
        return self.masks[i].astype(np.float32) / 255.0
