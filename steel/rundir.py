"""The run directory: which files make a finished fold, where its checkpoints are, and which split they were
trained on.

A fold dir ``RUN_DIR/fold-K/`` is done (``fold_done``) when ``steel fit`` returned: metrics.json says
``"complete": true`` (written at the end of fit) and best.ckpt and last.ckpt exist. Every checkpoint that
``steel fit`` writes records the fold and the split hash of its folds CSV (``steel.folds.split_hash``) under
``SPLIT_KEY``; ``check_fold`` compares that record with the run's folds.csv before a checkpoint predicts
"out-of-fold" images, so a fold trained on another split is refused instead of scoring images it trained on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from steel.errors import SteelError
from steel.io import read_json

SPLIT_KEY = "steel_split"  # checkpoint key: {"fold": int, "split_hash": str, "folds_csv": str}
FOLDS_FILE = "folds.csv"
METRICS_FILE = "metrics.json"


def n_folds(run_dir: str | os.PathLike) -> int:
    """Number of folds of a run dir: from its folds.csv, else from its fold-K/ dirs; SteelError if neither."""
    from steel.folds import load_folds

    run_dir = Path(run_dir)
    if (run_dir / FOLDS_FILE).is_file():
        return int(load_folds(run_dir / FOLDS_FILE)["fold"].max()) + 1
    n = len(list(run_dir.glob("fold-*/")))
    if n == 0:
        raise SteelError(f"{run_dir}: not a run dir (no {FOLDS_FILE}, no fold-K/ dirs)")
    return n


def fold_checkpoints(run_dir: str | os.PathLike, checkpoint: str = "best.ckpt") -> list[Path]:
    """fold-K/<checkpoint> for every fold K of the run; SteelError naming the first missing one."""
    run_dir = Path(run_dir)
    n = n_folds(run_dir)
    ckpts = [run_dir / f"fold-{k}" / checkpoint for k in range(n)]
    missing = [c for c in ckpts if not c.is_file()]
    if missing:
        raise SteelError(
            f"{missing[0]}: checkpoint missing ({len(missing)} of {n} folds); finish the folds first"
        )
    return ckpts


def fold_done(fold_dir: str | os.PathLike) -> bool:
    """True when ``steel fit`` finished this fold: metrics.json with "complete": true, best.ckpt and last.ckpt."""
    fold_dir = Path(fold_dir)
    if not ((fold_dir / "best.ckpt").is_file() and (fold_dir / "last.ckpt").is_file()):
        return False
    try:
        metrics = read_json(fold_dir / METRICS_FILE)
    except (OSError, ValueError):
        return False
    return isinstance(metrics, dict) and metrics.get("complete") is True


def split_record(ckpt_path: str | os.PathLike) -> dict[str, Any] | None:
    """The {"fold", "split_hash", "folds_csv"} a checkpoint was trained with, or None if it records none;
    SteelError naming the file if it is not a readable checkpoint (memory-mapped: the weights are not read)."""
    from steel.checkpoints import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    record = ckpt.get(SPLIT_KEY) if isinstance(ckpt, dict) else None
    return dict(record) if isinstance(record, dict) else None


def split_of(folds_csv: str | os.PathLike, fold: int) -> dict[str, Any]:
    """The record a fit stores in its checkpoints and metrics.json: {"fold", "split_hash", "folds_csv"}."""
    from steel.folds import split_hash

    return {
        "fold": int(fold),
        "split_hash": split_hash(folds_csv),
        "folds_csv": str(Path(folds_csv).resolve()),
    }


def check_fold(
    ckpt_path: str | os.PathLike, fold: int, split_hash: str, run_dir: str | os.PathLike | None = None
) -> None:
    """SteelError (one line: fold, checkpoint, what differs) unless the checkpoint was trained as fold ``fold``
    of the split whose hash is ``split_hash`` (the run's folds.csv); ``run_dir`` only names the run."""
    where = f" of {run_dir}" if run_dir is not None else ""
    record = split_record(ckpt_path)
    if record is None:
        raise SteelError(
            f"fold {fold}{where}: {ckpt_path} records no fold/split hash (not written by `steel fit` of this "
            f"version); cannot prove its predictions are out-of-fold, retrain the fold"
        )
    got_fold, got_hash = record.get("fold"), record.get("split_hash")
    if got_fold != fold:
        raise SteelError(
            f"fold {fold}{where}: {ckpt_path} was trained as fold {got_fold} (of {record.get('folds_csv')})"
        )
    if got_hash != split_hash:
        raise SteelError(
            f"fold {fold}{where}: {ckpt_path} was trained on another split: split hash {got_hash} "
            f"({record.get('folds_csv')}), the run's folds.csv has {split_hash}"
        )


def check_run(run_dir: str | os.PathLike, checkpoint: str = "best.ckpt") -> list[Path]:
    """fold_checkpoints of the run, each checked (``check_fold``) against the run's folds.csv."""
    from steel.folds import split_hash

    run_dir = Path(run_dir)
    if not (run_dir / FOLDS_FILE).is_file():
        raise SteelError(f"{run_dir}: no {FOLDS_FILE} (the split the folds were trained on)")
    ckpts = fold_checkpoints(run_dir, checkpoint)
    h = split_hash(run_dir / FOLDS_FILE)
    for k, ck in enumerate(ckpts):
        check_fold(ck, k, h, run_dir)
    return ckpts


def data_dir_of(run_dir: str | os.PathLike) -> str:
    """data.data_dir from the resolved config of a run (a fold's config.yaml wins over the run's)."""
    import yaml

    run_dir = Path(run_dir)
    for p in sorted(run_dir.glob("fold-*/config.yaml")) + [run_dir / "config.yaml"]:
        if p.is_file():
            cfg = yaml.safe_load(p.read_text()) or {}
            data = cfg.get("data") or {}
            data = data.get("init_args", data)
            if data.get("data_dir"):
                return str(data["data_dir"])
            over = (cfg.get("launch") or {}).get("overrides") or []
            if "--data.data_dir" in over:
                return over[over.index("--data.data_dir") + 1]
    raise SteelError(f"{run_dir}: no data.data_dir in its config; pass --data-dir")
