"""Stratified K folds: iterstrat MultilabelStratifiedKFold on [has_1..has_4, no_defect]."""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from steel.errors import SteelError
from steel.io import atomic_path
from steel.labels import CLASSES, read_csv, read_train

HAS = [f"has_{c}" for c in CLASSES]


def make_folds(table: pd.DataFrame, n_folds: int = 10, seed: int = 42) -> pd.DataFrame:
    """Assign each image of a per-image table to a fold: DataFrame ImageId, fold, has_1..has_4."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    if n_folds < 2:
        raise SteelError(f"--n-folds {n_folds}: need at least 2 folds")
    if len(table) < n_folds:
        raise SteelError(f"{len(table)} images cannot be split into {n_folds} folds")
    y = table[HAS].to_numpy()
    y = np.concatenate([y, (y.sum(1) == 0)[:, None].astype(int)], axis=1)
    fold = np.full(len(table), -1, dtype=int)
    splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(table)), y)):
        fold[val_idx] = k
    out = table[["ImageId"]].copy()
    out["fold"] = fold
    out[HAS] = table[HAS].to_numpy()
    return out


def write_folds(folds: pd.DataFrame, path: str | os.PathLike, command: str | None = None) -> None:
    """Write a folds CSV atomically, and the command that made it beside it (``<name>.cmd``)."""
    path = Path(path)
    with atomic_path(path, ".csv") as tmp:
        folds.to_csv(tmp, index=False)
    if command:
        with atomic_path(path.with_suffix(".cmd")) as tmp:
            tmp.write_text(command + "\n")


def load_folds(path: str | os.PathLike) -> pd.DataFrame:
    """Read a folds CSV (ImageId, fold, has_1..has_4); SteelError if malformed."""
    path = Path(path)
    if not path.exists():
        raise SteelError(f"{path}: folds file not found")
    df = read_csv(path)  # SteelError for a directory, an empty file, binary or ragged rows
    missing = [c for c in ["ImageId", "fold", *HAS] if c not in df.columns]
    if missing:
        raise SteelError(f"{path}: missing column '{missing[0]}'")
    for col in ["fold", *HAS]:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() | (values < 0) | (values != values.round())
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise SteelError(f"{path}: line {i + 2}: {col} {df[col].iloc[i]!r} is not a whole number >= 0")
        df[col] = values.astype(int)
    return df


def split_hash(folds_csv: str | os.PathLike) -> str:
    """Content hash of a split: sha256 of the sorted "ImageId,fold" lines, first 16 hex digits.

    Only which image is in which fold counts: line endings, column order and the has_* columns do not."""
    df = load_folds(folds_csv)
    lines = sorted(f"{i},{int(f)}" for i, f in zip(df["ImageId"].astype(str), df["fold"]))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def split(folds_csv: str | os.PathLike, fold: int) -> tuple[list[str], list[str]]:
    """(train ImageIds, validation ImageIds) for fold ``fold`` of a folds CSV."""
    df = load_folds(folds_csv)
    n = int(df["fold"].max()) + 1
    if not 0 <= fold < n:
        raise SteelError(f"fold {fold} outside 0..{n - 1} of {folds_csv}")
    val = df["fold"] == fold
    return df.loc[~val, "ImageId"].tolist(), df.loc[val, "ImageId"].tolist()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", help="directory with train.csv and train_images/")
    p.add_argument("--n-folds", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=None, help="output CSV (default folds/<data dir name>_<n>f_s<seed>.csv)")


def main(args: argparse.Namespace) -> int:
    table = read_train(args.data_dir)
    folds = make_folds(table, args.n_folds, args.seed)
    out = args.out or f"folds/{Path(args.data_dir).resolve().name}_{args.n_folds}f_s{args.seed}.csv"
    write_folds(folds, out, "steel " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    counts = folds.groupby("fold")[HAS].sum()
    print(f"wrote {len(folds)} images in {args.n_folds} folds to {out}")
    print(
        "per-fold defect counts (min-max): "
        + ", ".join(f"class {c}: {counts[f'has_{c}'].min()}-{counts[f'has_{c}'].max()}" for c in CLASSES)
    )
    return 0
