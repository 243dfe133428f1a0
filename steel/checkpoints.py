"""Reading checkpoint files: any failure to unpickle or unzip one becomes a SteelError naming the file.

torch.load reports a file that is not a checkpoint with whatever its unpickler trips on (``KeyError: 101``
for a text file, ``UnpicklingError``, ``PytorchStreamReader failed ...``), naming no file; commands that
read checkpoints call ``check_checkpoints`` on all of them before doing any work.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from steel.errors import SteelError


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = True) -> dict[str, Any]:
    """The dict saved in a Lightning checkpoint file (``state_dict``, ``hyper_parameters``, ...).

    ``mmap``: memory-map the tensors of a zip checkpoint (nothing but the pickle is read until a tensor is
    used). Raises SteelError naming the file if it is missing, empty, not a torch file, or has no state_dict.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        raise SteelError(f"{path}: is a directory, expected a checkpoint file")
    if not path.is_file():
        raise SteelError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise SteelError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:  # a legacy (non-zip) file cannot be memory-mapped; a truncated zip is no zip either
        ckpt = torch.load(
            path, map_location=map_location, weights_only=False, mmap=mmap and zipfile.is_zipfile(path)
        )
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.load fails on a non-checkpoint with any exception type
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:120]
        reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise SteelError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise SteelError(f"{path}: not a Lightning checkpoint (no state_dict inside)")
    return ckpt


def check_checkpoints(paths: Iterable[str | os.PathLike]) -> None:
    """Open every checkpoint (memory-mapped, weights not read); SteelError naming the first bad one."""
    for p in paths:
        load_checkpoint(p)
