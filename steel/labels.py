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
        what = (
            "is a file, expected a directory of images"
            if images_dir.exists()
            else "image directory not found"
        )
        raise SteelError(f"{images_dir}: {what}")
    return sorted(p.name for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def image_shape(images_dir: str | os.PathLike, names: list[str] | None = None) -> tuple[int, int]:
    """(H, W) shared by the images of a directory (the Kaggle shape if it has none).

    Reads every header (no decoding). SteelError naming the first image whose size differs from the
    majority's, or the first unreadable one.
    """
    from steel.images import image_size

    names = list_images(images_dir) if names is None else names
    if not names:
        return KAGGLE_SHAPE
    sizes = np.array([image_size(Path(images_dir) / n) for n in names])
    shapes, inverse, counts = np.unique(sizes, axis=0, return_inverse=True, return_counts=True)
    common = int(np.argmax(counts))
    if len(shapes) > 1:
        i = int(np.flatnonzero(inverse.ravel() != common)[0])
        h, w = shapes[common]
        raise SteelError(
            f"{Path(images_dir) / names[i]}: image is {sizes[i][0]}x{sizes[i][1]}, "
            f"but {counts[common]} of the {len(names)} images are {h}x{w}"
        )
    return int(shapes[0][0]), int(shapes[0][1])


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """A label or submission CSV as strings (no NA parsing); SteelError naming the file (and line) if it is
    missing, a directory, empty, not text, or has a row with more fields than the header."""
    import csv
    import warnings

    path = Path(path)
    if path.is_dir():
        raise SteelError(f"{path}: is a directory, expected a CSV file")
    if not path.is_file():
        raise SteelError(f"{path}: file not found")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            df = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except pd.errors.EmptyDataError:
        raise SteelError(f"{path}: empty file, expected a CSV with a header line") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise SteelError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None
    if any(issubclass(w.category, pd.errors.ParserWarning) for w in caught):
        # pandas drops the surplus fields of such a row (on the first data line it would even take
        # column 1 as the index without index_col=False): find the row to name it
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = csv.reader(f)
            n = len(next(rows))
            line = next(i for i, row in enumerate(rows, start=2) if len(row) > n)
        raise SteelError(f"{path}: line {line}: more fields than the {n} columns of the header")
    return df


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
    if not data_dir.is_dir():
        what = "is a file, expected" if data_dir.exists() else "not found; expected"
        raise SteelError(f"{data_dir}: {what} a data directory with train.csv and train_images/")
    path = Path(csv) if csv is not None else data_dir / "train.csv"
    images_dir = data_dir / "train_images"
    df = _long_format(read_csv(path), path)
    names = list_images(images_dir)
    shape = image_shape(images_dir, names)
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
    return _long_format(read_csv(path), path)
