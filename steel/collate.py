"""SlotCollate: loader workers collate each batch into a shared-memory buffer they reuse once it is released.

A DataLoader worker normally collates every batch into fresh shared-memory segments, one a tensor, which
the main process maps and later unmaps. On a 2-core VM that costs ~0.3 ms of CPU an image of 256x512
(segment creation and first-touch page faults; a reused segment costs ~0.06 ms, BENCHMARKS.md "Training").

SlotCollate keeps ``slots`` buffers a worker and puts all the tensors of a batch in one of them. A buffer
is reused only once the main process has let go of the batch written there, so a batch that is kept (or
a view of it) is never overwritten:
- ``flags`` (uint8 (workers, slots), shared memory made before the workers start) is 1 while a batch of
  worker w's slot k is out; the worker sets it before sending the batch.
- The batch travels as a ``_SlotBatch``. Unpickled in the main process (or its pin-memory thread) it turns
  into a plain dict and a ``weakref.finalize`` on the buffer's storage: when the last tensor or view of
  it dies, flag (w, k) goes back to 0.
- A worker writes only into a slot whose flag is 0; with none free it collates a fresh segment as
  ``default_collate`` does. Without workers (``num_workers=0``) it is ``default_collate``.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

_ALIGN = 64  # byte offset of each tensor in a buffer: a multiple of every element size
_FLAGS: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()  # token -> flags
_TOKENS = itertools.count()


class SlotCollate:
    """collate_fn for dict items (tensors of equal shape per key, other values collated by
    ``default_collate``): a batch dict whose tensors share one reused shared-memory buffer of the worker.

    Args:
        num_workers: the DataLoader's ``num_workers``.
        slots: buffers a worker keeps; at least ``prefetch_factor`` + 2 (queued batches, the one in use and
            the one the trainer prefetches) or workers fall back to fresh segments more often.
    """

    def __init__(self, num_workers: int, slots: int = 6) -> None:
        self.token = next(_TOKENS)
        self._shared = torch.zeros(max(1, num_workers), slots, dtype=torch.uint8).share_memory_()
        self.flags = self._shared.numpy()  # the same memory, in every worker too
        _FLAGS[self.token] = self.flags  # found there by _arrive in this process
        self._pool: list[torch.UntypedStorage | None] = [None] * slots  # per worker process
        self.fresh = 0  # batches this process collated into fresh segments (all slots out)

    def __getstate__(self) -> dict:  # spawned workers: the shared tensor travels, numpy would copy
        return {"token": self.token, "_shared": self._shared, "_pool": [None] * len(self._pool), "fresh": 0}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, flags=state["_shared"].numpy())

    def _slot(self, worker: int, nbytes: int) -> int | None:
        """A free slot of ``worker`` with a buffer of at least ``nbytes`` (allocated here if needed), or None."""
        for k in np.flatnonzero(self.flags[worker] == 0).tolist():
            buf = self._pool[k]
            if buf is None or buf.nbytes() < nbytes:
                self._pool[k] = torch.empty(nbytes, dtype=torch.uint8).share_memory_().untyped_storage()
            return k
        return None

    def __call__(self, items: list[dict]) -> Any:
        info = get_worker_info()
        if info is None or info.id >= len(self.flags) or not items or not isinstance(items[0], dict):
            return default_collate(items)
        keys = [k for k, v in items[0].items() if torch.is_tensor(v)]
        layout, nbytes = [], 0
        for k in keys:
            t = items[0][k]
            layout.append((k, t.dtype, (len(items), *t.shape), nbytes))
            nbytes += -(-len(items) * t.nbytes // _ALIGN) * _ALIGN
        slot = self._slot(info.id, nbytes) if keys else None
        if slot is None:
            self.fresh += 1
            return default_collate(items)
        storage = self._pool[slot]
        batch = {}
        for k, dtype, shape, offset in layout:
            out = torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)
            torch.stack([it[k] for it in items], out=out)  # raises as default_collate on unequal shapes
            batch[k] = out
        for k in items[0]:
            if k not in batch:
                batch[k] = default_collate([it[k] for it in items])
        self.flags[info.id, slot] = 1
        return _SlotBatch(self.token, info.id, slot, batch)


class _SlotBatch:
    """A batch in slot (worker, slot); unpickles as the batch dict, releasing the slot when it dies."""

    def __init__(self, token: int, worker: int, slot: int, batch: dict) -> None:
        self.args = (token, worker, slot, batch)

    def __reduce__(self) -> tuple:
        return _arrive, self.args


def _release(flags: np.ndarray, worker: int, slot: int) -> None:
    flags[worker, slot] = 0


def _arrive(token: int, worker: int, slot: int, batch: dict) -> dict:
    """The batch dict, with its slot released when the storage of its tensors is freed."""
    flags = _FLAGS.get(token)
    if flags is not None:
        storage = next(v for v in batch.values() if torch.is_tensor(v)).untyped_storage()
        weakref.finalize(storage, _release, flags, worker, slot)
    return batch
