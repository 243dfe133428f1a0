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
