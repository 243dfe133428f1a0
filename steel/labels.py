"""Kaggle label files: train.csv in both formats, the per-image table, submissions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from steel import KAGGLE_SHAPE, N_CLASSES, rle
from steel.errors import SteelError

CLASSES = tuple(range(1, N_CLASSES + 1))
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(images_dir: str | os.PathLike) -> list[str]:
    """Sorted image file names in a directory; SteelError if it is missing."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise SteelError(f"{images_dir}: image directory not found")
    return sorted(p.name for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def image_shape(images_dir: str | os.PathLike, names: list[str] | None = None) -> tuple[int, int]:
    """(H, W) of the first image of a directory; the Kaggle shape if it has none."""
    import cv2

    names = list_images(images_dir) if names is None else names
    if not names:
        return KAGGLE_SHAPE
    path = Path(images_dir) / names[0]
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise SteelError(f"{path}: cannot read image")
    return int(img.shape[0]), int(img.shape[1])


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise SteelError(f"{path}: file not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise SteelError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None


def _long_format(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Normalise either Kaggle layout to columns ImageId, ClassId (int), EncodedPixels, line."""
    df = df.copy()
    df["line"] = np.arange(len(df)) + 2  # header is line 1
    if "ImageId_ClassId" in df.columns:
        if "EncodedPixels" not in df.columns:
            raise SteelError(f"{path}: missing column 'EncodedPixels'")
        parts = df["ImageId_ClassId"].str.rsplit("_", n=1, expand=True)
        if parts.shape[1] != 2 or parts[1].isna().any():
            line = int(df["line"][parts[1].isna()].iloc[0]) if parts.shape[1] == 2 else 2
            raise SteelError(f"{path}: line {line}: ImageId_ClassId must look like 'xxx.jpg_1'")
        df["ImageId"], df["ClassId"] = parts[0], parts[1]
    else:
        for col in ("ImageId", "ClassId", "EncodedPixels"):
            if col not in df.columns:
                raise SteelError(
                    f"{path}: missing column '{col}' (expected ImageId,ClassId,EncodedPixels or ImageId_ClassId,EncodedPixels)"
                )
    cls = pd.to_numeric(df["ClassId"], errors="coerce")
    bad = cls.isna() | ~cls.isin(CLASSES)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise SteelError(
            f"{path}: line {df['line'].iloc[i]}: class {df['ClassId'].iloc[i]!r} outside 1..{N_CLASSES}"
        )
    df["ClassId"] = cls.astype(int)
    dup = df.duplicated(["ImageId", "ClassId"], keep="first")
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise SteelError(
            f"{path}: line {df['line'].iloc[i]}: duplicate row for image {df['ImageId'].iloc[i]} class {df['ClassId'].iloc[i]}"
        )
    return df[["ImageId", "ClassId", "EncodedPixels", "line"]]


def read_train(data_dir: str | os.PathLike, csv: str | os.PathLike | None = None) -> pd.DataFrame:
    """One row per image of ``train_images/``: ImageId, rle_1..4, has_1..4, area_1..4.

    Reads ``train.csv`` in either Kaggle layout; images without rows are defect-free. Raises SteelError
    naming the file and line for a missing column, malformed RLE, unknown image, bad class or duplicate.
    """
    data_dir = Path(data_dir)
    path = Path(csv) if csv is not None else data_dir / "train.csv"
    images_dir = data_dir / "train_images"
    names = list_images(images_dir)
    shape = image_shape(images_dir, names)
    df = _long_format(_read_csv(path), path)
    return build_table(df, names, shape, path, images_dir)


def build_table(
    df: pd.DataFrame, names: list[str], shape: tuple[int, int], path: Path, images_dir: Path
) -> pd.DataFrame:
    """Per-image table from long-format rows (ImageId, ClassId, EncodedPixels, line)."""
    known = set(names)
    unknown = ~df["ImageId"].isin(known)
    if unknown.any():
        i = int(np.flatnonzero(unknown.to_numpy())[0])
        raise SteelError(
            f"{path}: line {df['line'].iloc[i]}: image {df['ImageId'].iloc[i]} has no file in {images_dir}"
        )
    table = pd.DataFrame({"ImageId": names})
    pos = pd.Series(np.arange(len(names)), index=names)
    for c in CLASSES:
        table[f"rle_{c}"] = ""
        table[f"area_{c}"] = 0
    for row in df.itertuples(index=False):  # one iteration per label row, not per pixel
        try:
            a = rle.area(row.EncodedPixels, shape)
        except ValueError as e:
            raise SteelError(
                f"{path}: line {row.line}: RLE of {row.ImageId} class {row.ClassId} malformed: {e}"
            ) from None
        i = pos[row.ImageId]
        table.iat[i, table.columns.get_loc(f"rle_{row.ClassId}")] = row.EncodedPixels.strip()
        table.iat[i, table.columns.get_loc(f"area_{row.ClassId}")] = a
    for c in CLASSES:
        table[f"has_{c}"] = (table[f"area_{c}"] > 0).astype(int)
    cols = (
        ["ImageId"]
        + [f"rle_{c}" for c in CLASSES]
        + [f"has_{c}" for c in CLASSES]
        + [f"area_{c}" for c in CLASSES]
    )
    table = table[cols]
    table.attrs["shape"] = shape
    return table


def masks_of(row: pd.Series | dict, shape: tuple[int, int]) -> np.ndarray:
    """(4, H, W) uint8 masks of one row of the per-image table."""
    return np.stack([rle.decode(row[f"rle_{c}"], shape) for c in CLASSES])


def write_train_csv(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a per-image table as a Kaggle train.csv (ImageId,ClassId,EncodedPixels; defect rows only)."""
    from steel.io import atomic_path

    rows = [
        (r["ImageId"], c, r[f"rle_{c}"]) for r in table.to_dict("records") for c in CLASSES if r[f"rle_{c}"]
    ]
    out = pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"])
    with atomic_path(path, ".csv") as tmp:
        out.to_csv(tmp, index=False)


def write_submission(image_ids: list[str], rles: list[list[str]], path: str | os.PathLike) -> None:
    """Write a submission, one row per (image, class): ImageId,EncodedPixels,ClassId.

    ``rles[i][c]`` is the RLE of class c+1 of image i ("" when empty).
    """
    from steel.io import atomic_path

    ids = np.repeat(np.asarray(image_ids, dtype=object), N_CLASSES)
    cls = np.tile(np.arange(1, N_CLASSES + 1), len(image_ids))
    enc = [s for per_image in rles for s in per_image]
    df = pd.DataFrame({"ImageId": ids, "EncodedPixels": enc, "ClassId": cls})
    with atomic_path(path, ".csv") as tmp:
        df.to_csv(tmp, index=False)


def read_submission(path: str | os.PathLike) -> pd.DataFrame:
    """Read a submission in either Kaggle layout: columns ImageId, ClassId, EncodedPixels, line."""
    path = Path(path)
    return _long_format(_read_csv(path), path)
