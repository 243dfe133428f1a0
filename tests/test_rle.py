import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from steel import rle


@settings(max_examples=200, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 40)), elements=st.integers(0, 1)))
def test_round_trip(mask):
    s = rle.encode(mask)
    assert np.array_equal(rle.decode(s, mask.shape), mask)
    assert rle.area(s, mask.shape) == int(mask.sum())


def test_known_strings_by_hand():
    # 3x4 image, pixels numbered down the columns: col0 = 1,2,3 ; col1 = 4,5,6 ; ...
    m = rle.decode("2 3 9 2", (3, 4))
    # pixels 2, 3 (column 0, rows 1-2), 4 (column 1, row 0), 9 (column 2, row 2), 10 (column 3, row 0)
    expected = np.array([[0, 1, 0, 1], [1, 0, 0, 0], [1, 0, 1, 0]], np.uint8)
    assert np.array_equal(m, expected)
    assert rle.encode(expected) == "2 3 9 2"
    assert rle.encode(np.ones((2, 2))) == "1 4"
    assert rle.encode(np.zeros((5, 5))) == ""
    assert rle.decode("", (2, 2)).sum() == 0
    assert rle.decode(float("nan"), (2, 2)).sum() == 0
    # adjacent runs are allowed and merge
    assert np.array_equal(rle.decode("1 2 3 2", (2, 2)), np.ones((2, 2), np.uint8))


def test_kaggle_shape_default():
    m = rle.decode("1 256 257 3")
    assert m.shape == (256, 1600) and m[:, 0].all() and m[:3, 1].all() and m.sum() == 259


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("1 2 3", "odd number"),
        ("0 2", "not positive"),
        ("-1 2", "not positive"),
        ("1 0", "length 0 is not positive"),
        ("5 1 2 1", "not sorted"),
        ("1 5 3 1", "overlap"),
        ("12 2", "ends past the last pixel"),
        ("1 x", "non-integer"),
        ("1.5 2", "non-integer"),
    ],
)
def test_malformed_rejected(bad, reason):
    with pytest.raises(ValueError, match=reason):
        rle.decode(bad, (3, 4))


@settings(max_examples=150, deadline=None)
@given(
    arrays(
        np.uint8,
        st.tuples(st.integers(1, 8), st.integers(1, 12), st.integers(1, 30)),
        elements=st.integers(0, 1),
    ),
    st.data(),
)
def test_run_masks_window_equals_slice_of_decode(masks, data):
    """Decode, window, areas, pixel order, and the window decoded straight into bits = ``pack_masks`` of the
    decoded window (overlapping classes too)."""
    C, H, W = masks.shape
    runs = rle.RunMasks([rle.encode(m) for m in masks], (H, W))
    np.testing.assert_array_equal(runs.decode(), masks)
    assert runs.areas.tolist() == masks.sum(axis=(1, 2)).tolist()
    assert runs.present.tolist() == np.flatnonzero(masks.any(axis=(1, 2))).tolist()
    y0, x0 = data.draw(st.integers(0, H - 1)), data.draw(st.integers(0, W - 1))
    h, w = data.draw(st.integers(1, H - y0)), data.draw(st.integers(1, W - x0))
    window = masks[:, y0 : y0 + h, x0 : x0 + w]
    np.testing.assert_array_equal(runs.window(y0, x0, h, w), window)
    packed = runs.packed_window(y0, x0, h, w)
    assert packed.dtype == np.uint8 and packed.shape == (h, w)
    want = (window << np.arange(C, dtype=np.uint8)[:, None, None]).sum(0, dtype=np.uint8)
    np.testing.assert_array_equal(packed, want)
    np.testing.assert_array_equal(rle.pack_masks(window), want)
    for c in runs.present:  # pixel k = the k-th defect pixel in Kaggle (column-major) order
        xs, ys = np.nonzero(masks[c].T)
        assert [runs.pixel(c, k) for k in range(int(runs.areas[c]))] == list(zip(ys.tolist(), xs.tolist()))


def test_packed_window_by_hand():
    # 3x4 image; class 0: pixels 2-4 (column 0 rows 1-2, column 1 row 0); class 2: pixels 4-6 (all of column 1)
    runs = rle.RunMasks(["2 3", "", "4 3"], (3, 4))
    full = np.array([[0, 5, 0, 0], [1, 4, 0, 0], [1, 4, 0, 0]], np.uint8)
    np.testing.assert_array_equal(runs.packed_window(0, 0, 3, 4), full)
    np.testing.assert_array_equal(runs.packed_window(1, 1, 2, 2), full[1:3, 1:3])
    assert not rle.RunMasks(["", "", ""], (3, 4)).packed_window(0, 0, 3, 4).any()


def test_run_masks_rejects_malformed():
    with pytest.raises(ValueError, match="overlap"):
        rle.RunMasks(["", "1 5 3 1"], (3, 4))
