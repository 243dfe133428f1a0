"""Out-of-fold (OOF) store: every train image once, scored by the fold model that did not train on it.

Layout of ``RUN_DIR/oof/`` (written into a temporary directory, renamed into place when complete):
``index.csv`` (ImageId, fold, row), ``cls.npy`` float32 (N, 4), ``masks.npy`` uint8 (N, 4, h, w) mask
probabilities quantised to round(p * 255) at a stride (``[::stride, ::stride]`` of the full map),
``truth.npy`` uint8 (N, 4, h, w) 0/1, ``meta.json``; a strided store written from full-resolution maps
also has ``hist.npy`` int32 (N, 2, 4, 256), their full-resolution level histograms. Arrays are .npy files opened memory-mapped, so
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
from steel.folds import load_folds
from steel.io import read_json, replace_dir, write_json
from steel.labels import masks_of, read_train
from steel.rundir import FOLDS_FILE, check_run, data_dir_of


def strided_shape(height: int, width: int, stride: int) -> tuple[int, int]:
    """(h, w) of a (height, width) map taken at ``[::stride, ::stride]``."""
    return -(-height // stride), -(-width // stride)


def quantise(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 round(p * 255)."""
    return np.rint(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)


def level_histograms(q: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Counts of each quantised level per class over all pixels and over truth pixels: q (C, H, W) uint8,
    truth (C, H, W) bool -> (2, C, 256) int32. Taken at full resolution by the writer of a strided store, so
    that the threshold sweep measures areas and Dice at full resolution (``steel.oof_stats``)."""
    c = q.shape[0]
    key = q.reshape(c, -1).astype(np.int64) + 256 * np.arange(c)[:, None]
    every = np.bincount(key.ravel(), minlength=256 * c)
    true = np.bincount(key[truth.reshape(c, -1)], minlength=256 * c)
    return np.stack([every, true]).reshape(2, c, 256).astype(np.int32)


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
        # .npy files of full size; rows go in with pwrite, so written pages sit in the page cache, not in RSS
        self.files = {}
        specs = [("cls", np.float32, (n, N_CLASSES)), ("masks", np.uint8, (n, N_CLASSES, h, w)),
                 ("truth", np.uint8, (n, N_CLASSES, h, w))]  # fmt: skip
        # a strided store keeps the full-resolution level histograms too, if every row comes at full resolution
        if self.stride > 1:
            specs.append(("hist", np.int32, (n, 2, N_CLASSES, 256)))
        self.full_res_rows = True
        for name, dtype, shape in specs:
            mm = np.lib.format.open_memmap(self.tmp / f"{name}.npy", "w+", dtype, shape)
            offset, row_bytes = mm.offset, mm[0].nbytes if n else 0
            del mm
            self.files[name] = (os.open(self.tmp / f"{name}.npy", os.O_WRONLY), offset, row_bytes, dtype)
        self.written = np.zeros(n, dtype=bool)
        self.meta = dict(meta or {})

    def _stride(self, a: np.ndarray) -> np.ndarray:
        if a.shape[-2:] == (self.height, self.width) and self.stride > 1:
            return a[..., :: self.stride, :: self.stride]
        return a

    def write(self, rows: np.ndarray, cls: np.ndarray, masks_prob: np.ndarray, truth: np.ndarray) -> None:
        """Store rows: cls (B, 4) probs, masks_prob (B, 4, H, W) in [0, 1] (full-res or strided), truth 0/1."""
        rows = np.asarray(rows, dtype=np.int64)
        for i, r in enumerate(rows):  # one pwrite per image row (~0.4 MB at stride 2), not per pixel
            self._put("cls", r, np.asarray(cls[i], dtype=np.float32))
            q, t = quantise(np.asarray(masks_prob[i])), np.asarray(truth[i]) != 0
            self._put("masks", r, self._stride(q))
            self._put("truth", r, self._stride(t).astype(np.uint8))
            if "hist" in self.files:
                if q.shape[-2:] == t.shape[-2:] == (self.height, self.width):
                    self._put("hist", r, level_histograms(q, t))
                else:
                    self.full_res_rows = False
        self.written[rows] = True

    def _put(self, name: str, row: int, value: np.ndarray) -> None:
        fd, offset, row_bytes, _ = self.files[name]
        data = np.ascontiguousarray(value).tobytes()
        assert len(data) == row_bytes, (name, value.shape)
        os.pwrite(fd, data, offset + int(row) * row_bytes)

    def close(self) -> Path:
        """Flush, check every row was written, write index + meta and move the store into place."""
        if not self.written.all():
            missing = [self.ids[i] for i in np.flatnonzero(~self.written)[:3]]
            self.abort()
            raise RuntimeError(
                f"OOF store incomplete: {int((~self.written).sum())} images not written, e.g. {missing}"
            )
        self._close_files(sync=True)
        if not self.full_res_rows:  # some rows came strided: no full-resolution histograms
            (self.tmp / "hist.npy").unlink(missing_ok=True)
        pd.DataFrame({"ImageId": self.ids, "fold": self.folds, "row": np.arange(len(self.ids))}).to_csv(
            self.tmp / "index.csv", index=False
        )
        meta = {
            "stride": self.stride,
            "height": self.height,
            "width": self.width,
            "n": len(self.ids),
            "classes": N_CLASSES,
        }
        write_json(self.tmp / "meta.json", {**self.meta, **meta})
        return replace_dir(self.tmp, self.oof_dir)  # fsynced; the old store stays readable until the swap

    def _close_files(self, sync: bool = False) -> None:
        for fd, *_ in self.files.values():
            if sync:
                os.fsync(fd)
            os.close(fd)
        self.files = {}

    def abort(self) -> None:
        """Drop the partial store."""
        self._close_files()
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
        hist = self.dir / "hist.npy"  # (N, 2, 4, 256) full-resolution level histograms, strided stores only
        self.full_hist: np.ndarray | None = np.load(hist, mmap_mode="r") if hist.is_file() else None

    def __len__(self) -> int:
        return len(self.ids)

    def probs(self, i: int) -> np.ndarray:
        """Mask probabilities of row i as float32 (4, h, w) in [0, 1]."""
        return self.masks[i].astype(np.float32) / 255.0


def build_oof(
    run_dir: str | os.PathLike,
    stride: int | None = None,
    tta: str | list[str] | None = None,
    batch_size: int = 8,
    data_dir: str | None = None,
    device: str | None = None,
    checkpoint: str = "best.ckpt",
) -> Path:
    """Predict every fold's validation images with that fold's checkpoint into ``RUN_DIR/oof/``.

    Each checkpoint must have been trained as that fold of the run's folds.csv (``steel.rundir.check_run``:
    fold number and split hash recorded at fit time), so every row is provably out-of-fold. Probabilities come
    from ``steel.ensemble`` (the path validation and prediction use)."""
    # torch, Lightning and the nets only when predicting: OOFStore readers (the sweep) stay light
    import torch
    from tqdm import tqdm

    from steel.ensemble import parse_tta, predict_batch
    from steel.images import read_grey
    from steel.module import load_model

    run_dir = Path(run_dir)
    tta_names = parse_tta(tta)
    ckpts = check_run(run_dir, checkpoint)
    split = load_folds(run_dir / FOLDS_FILE)
    n_folds = len(ckpts)
    data_dir = data_dir or data_dir_of(run_dir)
    table = read_train(data_dir).set_index("ImageId")
    unknown = sorted(set(split["ImageId"]) - set(table.index))
    if unknown:
        raise SteelError(f"{run_dir / 'folds.csv'}: image {unknown[0]} is not in {data_dir}/train_images")
    h, w = table.attrs["shape"]
    stride = int(stride or (2 if h * w >= 256 * 800 else 1))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    meta = {"data_dir": str(Path(data_dir).resolve()), "tta": tta_names, "members": [str(run_dir.resolve())],
            "checkpoints": [str(c.resolve()) for c in ckpts]}  # fmt: skip
    with OOFWriter(
        run_dir / "oof", split["ImageId"].tolist(), split["fold"].to_numpy(), h, w, stride, meta
    ) as writer:
        bar = tqdm(total=len(split), desc="oof", unit="img")
        for k in range(n_folds):
            model = load_model(ckpts[k], map_location=device)
            rows = np.flatnonzero(split["fold"].to_numpy() == k)
            for start in range(0, len(rows), batch_size):
                r = rows[start : start + batch_size]
                ids = split["ImageId"].to_numpy()[r]
                imgs = np.stack([read_grey(Path(data_dir) / "train_images" / i) for i in ids])
                x = torch.from_numpy(imgs).to(device).float().div_(255).unsqueeze(1)
                probs, cls = predict_batch(model.net, x, model.hparams.get("input_size"), tta_names)
                truth = np.stack([masks_of(table.loc[i], (h, w)) for i in ids])
                writer.write(r, cls.cpu().numpy(), probs.cpu().numpy(), truth)  # full-res: see hist.npy
                bar.update(len(r))
            del model
        bar.close()
    print(
        f"oof: {len(split)} images from {n_folds} folds, stride {stride}, TTA {','.join(tta_names)} -> {run_dir / 'oof'}"
    )
    return run_dir / "oof"


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="run directory with fold-K/best.ckpt for every fold of folds.csv")
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="keep every s-th pixel (default 2 for >= 256x800 images, else 1)",
    )
    p.add_argument("--tta", default="none", help="comma-separated: none,hflip,vflip")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data-dir", default=None, help="default: data.data_dir of the run's config")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--checkpoint", default="best.ckpt", help="checkpoint file name in each fold dir")


def main(args) -> int:
    build_oof(
        args.run_dir, args.stride, args.tta, args.batch_size, args.data_dir, args.device, args.checkpoint
    )
    from steel import tracking  # W&B lineage: the folds' checkpoints -> this OOF store

    tracking.log_oof(args.run_dir)
    return 0
