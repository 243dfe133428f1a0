"""SlotCollate through real DataLoader worker processes: batches are what default_collate gives, a batch (or a
view of it) that is kept is never overwritten, and released buffers are reused."""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from steel.collate import SlotCollate
from steel.data import SteelDataModule

N, SLOTS = 40, 3


class Items(Dataset):
    """Item i: tensors of three dtypes whose every value depends on i, and non-tensor fields."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {
            "image": (torch.arange(2 * 64 * 80) % 251 + i).to(torch.uint8).view(2, 64, 80),
            "score": torch.linspace(0, 1, 7) * i,
            "count": torch.tensor([i, -i]),
            "image_id": f"{i}.jpg",
            "fold": i % 3,
        }


class Counting(SlotCollate):
    """Each batch also says how many batches its worker had collated into fresh segments before it."""

    def __call__(self, items: list[dict]):
        for it in items:
            it["fresh"] = torch.tensor(self.fresh)
        return super().__call__(items)


def expected(idx: list[int]) -> dict:
    return default_collate([Items()[i] for i in idx])


def assert_batch(b: dict, idx: list[int]) -> None:
    want = expected(idx)
    assert set(b) - {"fresh"} == set(want)
    for k, v in want.items():
        if torch.is_tensor(v):
            assert b[k].dtype == v.dtype and torch.equal(b[k], v), k
        else:
            assert b[k] == v, k


def loader(collate: SlotCollate, batch_size: int = 4, **kw) -> DataLoader:
    return DataLoader(Items(), batch_size=batch_size, num_workers=2, collate_fn=collate, **kw)


def batches_of(batch_size: int = 4) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, N))) for i in range(0, N, batch_size)]


def test_kept_batches_and_views_are_never_overwritten() -> None:
    collate = Counting(2, slots=SLOTS)
    kept = list(loader(collate))  # all 10 held: 3 slots a worker, the other 4 batches in fresh segments
    views = [b["image"][:, 1] for b in loader(collate)]  # only a view of each batch's buffer is kept
    assert collate.flags.sum() == 2 * SLOTS  # every slot out
    for b, idx, v in zip(kept, batches_of(), views):
        assert_batch(b, idx)
        assert torch.equal(v, expected(idx)["image"][:, 1])
    assert max(int(b["fresh"].max()) for b in kept) > 0
    del kept, views, b, v
    gc.collect()
    assert collate.flags.sum() == 0  # every slot back once nothing refers to its buffer


def test_released_buffers_are_reused() -> None:
    collate = Counting(2, slots=SLOTS)
    fresh = []
    for b, idx in zip(loader(collate), batches_of()):  # each batch dropped before the next
        assert_batch(b, idx)
        fresh.append(int(b["fresh"].max()))
    assert fresh == [0] * len(fresh)  # no fresh segment: the workers wrote into released slots only
    del b
    assert collate.flags.sum() == 0


def test_last_short_batch_and_spawned_workers() -> None:
    collate = SlotCollate(2, slots=SLOTS)
    got = [b for b in loader(collate, batch_size=6, multiprocessing_context="spawn")]
    for b, idx in zip(got, batches_of(6), strict=True):  # 40 = 6 * 6 + 4
        assert_batch(b, idx)
    assert collate.flags.sum() > 0
    del got, b
    assert collate.flags.sum() == 0


def test_without_workers_it_is_default_collate() -> None:
    out = SlotCollate(0)([Items()[i] for i in (3, 5)])
    assert_batch(out, [3, 5])
    assert not out["image"].is_shared()


def test_datamodule_batches_equal_single_process(synth_dir: Path, folds_csv: Path) -> None:
    def val_batches(workers: int) -> list[dict]:
        dm = SteelDataModule(str(synth_dir), str(folds_csv), 0, batch_size=3, num_workers=workers,
                             pin_memory=False, persistent_workers=False)  # fmt: skip
        dm.setup("fit")
        return list(dm.val_dataloader())

    single, multi = val_batches(0), val_batches(2)
    assert len(single) == len(multi) > 1
    for a, b in zip(single, multi):
        assert a.keys() == b.keys() and a["image_id"] == b["image_id"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert b["image"].is_shared() and b["image"].untyped_storage() is b["mask"].untyped_storage()
