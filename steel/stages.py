"""Training stages: a fold that starts from the weights of the same fold of an earlier run, without leaking.

``steel fit --init_from PATH`` (PATH a checkpoint, or an earlier run dir: its ``fold-<data.fold>/best.ckpt``)
and ``steel launch --init-from RUN_DIR`` (every fold from the same fold of RUN_DIR) copy model weights only --
the whole net (``--init_part full``) or its encoder (``encoder``: e.g. a classification-only run's encoder
under a segmentation net, 12th place) -- and the optimiser, scheduler and epoch count start fresh. Fold K of
the new stage validates on fold K of its split; a checkpoint trained as another fold or on another split has
seen those images in training, so it is refused (``steel.rundir.check_fold``: the fold and split hash every
checkpoint of ``steel fit`` records), as is an earlier run dir whose folds.csv is another split.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from steel.errors import SteelError
from steel.rundir import FOLDS_FILE, check_fold, fold_done

if TYPE_CHECKING:
    import torch

INIT_PARTS = ("full", "encoder")
InitPart = Literal["full", "encoder"]
PREFIX = {"full": "net.", "encoder": "net.net.encoder."}  # SteelModule state_dict keys of each part


def init_checkpoint(init_from: str | os.PathLike, fold: int) -> Path:
    """The checkpoint a fold starts from: ``init_from`` itself if it is a file, else ``init_from/fold-K/best.ckpt``
    of a finished fold K of an earlier run dir; SteelError (one line) if there is none."""
    path = Path(init_from)
    if path.is_file():
        return path
    if not path.is_dir():
        raise SteelError(f"--init_from {path}: no such checkpoint or run dir")
    fold_dir = path / f"fold-{fold}"
    if not fold_done(fold_dir):
        state = "is not finished" if fold_dir.is_dir() else "was never run"
        raise SteelError(
            f"--init_from {path}: its fold {fold} {state} ({fold_dir}); a stage starts each fold from the same "
            f"fold of the earlier run, so finish that fold first"
        )
    return fold_dir / "best.ckpt"


def check_init(ckpt: str | os.PathLike, fold: int, split_hash: str) -> None:
    """SteelError (one line) unless ``ckpt`` was trained as fold ``fold`` of the split with ``split_hash``."""
    try:
        check_fold(ckpt, fold, split_hash)
    except SteelError as e:
        raise SteelError(f"--init_from: {e} (its validation images would be in-sample)") from None


def part_state(
    ckpt: str | os.PathLike, target: dict[str, torch.Tensor], part: InitPart
) -> dict[str, torch.Tensor]:
    """The tensors of ``part`` (full net or encoder) of a checkpoint, checked key by key and shape by shape
    against ``target`` (a SteelModule state_dict); SteelError naming the first difference and both nets."""
    from steel.checkpoints import load_checkpoint

    if part not in PREFIX:
        raise SteelError(f"--init_part {part!r}: choose one of {', '.join(INIT_PARTS)}")
    data = load_checkpoint(ckpt)
    prefix = PREFIX[part]
    src = {k: v for k, v in data["state_dict"].items() if k.startswith(prefix)}
    dst = {k: v for k, v in target.items() if k.startswith(prefix)}
    hp: dict[str, Any] = data.get("hyper_parameters") or {}
    theirs = f"{hp.get('arch')}/{hp.get('encoder')}"
    missing, extra = sorted(set(dst) - set(src)), sorted(set(src) - set(dst))
    bad = [k for k in sorted(set(src) & set(dst)) if tuple(src[k].shape) != tuple(dst[k].shape)]
    if missing or extra or bad:
        if bad:
            k = bad[0]
            what = f"{k} is {tuple(src[k].shape)} there, {tuple(dst[k].shape)} here"
        else:
            k = (missing or extra)[0]
            what = f"{k} is {'missing there' if missing else 'not in this model'}"
        raise SteelError(
            f"--init_from {ckpt}: its {part} net ({theirs}) does not fit this model: "
            f"{len(missing) + len(extra) + len(bad)} tensors differ, e.g. {what}"
        )
    return src


def load_init(module: torch.nn.Module, ckpt: str | os.PathLike, part: InitPart) -> int:
    """Copy the ``part`` weights of ``ckpt`` into ``module`` (a SteelModule) in place; the number of tensors."""
    import torch

    state = part_state(ckpt, module.state_dict(), part)
    with torch.no_grad():
        module.load_state_dict(state, strict=False)
    return len(state)


def check_lineage(run_dir: Path, folds: list[int], init_from: str | os.PathLike | None) -> None:
    """SteelError (one line) if a fold of ``run_dir`` was already started (its config.yaml) from another
    ``init_from`` than this launch's (or from none): its resumed or finished folds would mix two stages."""
    want = Path(init_from).resolve() if init_from else None
    for k in folds:
        path = run_dir / f"fold-{k}" / "config.yaml"
        if not path.is_file():
            continue
        try:
            value = (yaml.safe_load(path.read_text()) or {}).get("init_from")
        except yaml.YAMLError:
            continue
        had = Path(value).resolve() if value else None
        if had != want:
            raise SteelError(
                f"fold {k} of {run_dir} was started from {value or 'scratch'} ({path}), this launch says "
                f"{init_from or 'scratch'}: launch it with the same --init-from, or use a new --run-dir"
            )


def check_stage(init_from: str | os.PathLike, run_dir: Path, folds: list[int]) -> list[Path]:
    """Refusals of ``steel launch --init-from`` before anything runs: the earlier run must be a run dir on this
    run's split, with each of ``folds`` finished and its best.ckpt trained as that fold of the split; a fold of
    this run already started from another run is refused too. Returns the checkpoint of each fold."""
    from steel.folds import split_hash

    init = Path(init_from)
    if init.is_file():
        raise SteelError(
            f"--init-from {init}: give the earlier run dir (fold K starts from its fold K); one checkpoint for "
            f"every fold would put each fold's validation images in its training"
        )
    if not init.is_dir():
        raise SteelError(f"--init-from {init}: no such run dir")
    here = split_hash(run_dir / FOLDS_FILE)
    if (init / FOLDS_FILE).is_file() and (there := split_hash(init / FOLDS_FILE)) != here:
        raise SteelError(
            f"--init-from {init}: that run is on another split (split hash {there} of {init / FOLDS_FILE}, this "
            f"run's {run_dir / FOLDS_FILE} has {here}): its folds trained on this run's validation images"
        )
    ckpts = []
    for k in folds:
        ckpt = init_checkpoint(init, k)
        check_init(ckpt, k, here)
        ckpts.append(ckpt)
    return ckpts
