import numpy as np
import pytest

from steel.errors import SteelError
from steel.oof import OOFStore, OOFWriter, quantise


def test_writer_reader_round_trip_and_atomic(tmp_path):
    rng = np.random.default_rng(0)
    n, h, w, s = 7, 16, 40, 2
    ids = [f"{i}.jpg" for i in range(n)]
    probs = rng.random((n, 4, h, w), dtype=np.float32)
    truth = (rng.random((n, 4, h, w)) > 0.7).astype(np.uint8)
    cls = rng.random((n, 4), dtype=np.float32)
    wr = OOFWriter(tmp_path / "oof", ids, np.arange(n) % 3, h, w, s, meta={"tta": ["none"]})
    order = rng.permutation(n)
    for chunk in np.array_split(order, 3):  # any order, in chunks
        wr.write(chunk, cls[chunk], probs[chunk], truth[chunk])
    assert not (tmp_path / "oof").exists()  # nothing visible before close
    wr.close()
    st = OOFStore(tmp_path)
    assert st.ids == ids and st.folds.tolist() == (np.arange(n) % 3).tolist() and st.stride == s
    assert st.masks.shape == (n, 4, 8, 20) and isinstance(st.masks, np.memmap)
    assert np.array_equal(st.masks, quantise(probs[..., ::2, ::2]))
    assert np.array_equal(st.truth, truth[..., ::2, ::2]) and np.allclose(st.cls, cls)
    assert np.abs(st.probs(3) - probs[3, :, ::2, ::2]).max() <= 0.5 / 255 + 1e-7
    assert st.meta["tta"] == ["none"] and st.height == h


def test_incomplete_or_failed_write_leaves_nothing(tmp_path):
    ids = ["a.jpg", "b.jpg"]
    wr = OOFWriter(tmp_path / "oof", ids, [0, 1], 8, 8, 1)
    wr.write(np.array([0]), np.zeros((1, 4)), np.zeros((1, 4, 8, 8)), np.zeros((1, 4, 8, 8)))
    with pytest.raises(RuntimeError, match="1 images not written, e.g. \\['b.jpg'\\]"):
        wr.close()
    with pytest.raises(ValueError):
        with OOFWriter(tmp_path / "oof", ids, [0, 1], 8, 8, 1) as wr:
            raise ValueError("crash while predicting")
    assert not (tmp_path / "oof").exists() and not list(tmp_path.glob(".oof*"))
    with pytest.raises(SteelError, match="no OOF store"):
        OOFStore(tmp_path)


def _record_fsyncs(monkeypatch) -> list[str]:
    """Paths fsynced from now on (resolved through /proc/self/fd)."""
    import os

    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_atomic_writes_fsync_file_and_directory(tmp_path, monkeypatch):
    from steel.io import write_json

    synced = _record_fsyncs(monkeypatch)
    write_json(tmp_path / "sub" / "a.json", {"x": 1})
    assert any(
        p.startswith(str(tmp_path / "sub" / ".a.json.")) for p in synced
    )  # the temp file, before rename
    assert synced[-1] == str(tmp_path / "sub")  # then the directory holding the rename
    assert (tmp_path / "sub" / "a.json").read_text().strip().startswith("{")


def test_store_close_fsyncs_every_file_and_swaps_old_store(tmp_path, monkeypatch):
    """close() fsyncs every file of the new store, then swaps it with the old one: a reader holding the old
    store keeps reading it, and afterwards only the new store is there."""
    n, h, w = 3, 4, 6
    ids = [f"{i}.jpg" for i in range(n)]

    def store(value: float) -> None:
        with OOFWriter(tmp_path / "oof", ids, [0, 1, 2], h, w, 1) as wr:
            wr.write(np.arange(n), np.zeros((n, 4)), np.full((n, 4, h, w), value), np.zeros((n, 4, h, w)))

    store(0.2)
    old = OOFStore(tmp_path)
    synced = _record_fsyncs(monkeypatch)
    store(0.8)
    names = {p.rsplit("/", 1)[-1] for p in synced}
    assert {"cls.npy", "masks.npy", "truth.npy", "index.csv", "meta.json"} <= names
    assert synced[-1] == str(tmp_path)
    assert int(old.masks.max()) == quantise(np.float32(0.2)) and int(OOFStore(tmp_path).masks.min()) == 204
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oof"]
