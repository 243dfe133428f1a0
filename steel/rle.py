"""Kaggle run-length encoding, vectorised.

Pixels are numbered from 1, top to bottom then left to right (column-major), and a string is
``"start length start length ..."``. An empty mask is the empty string.
"""

from __future__ import annotations

import warnings

import numpy as np

from steel import KAGGLE_SHAPE


def encode(mask: np.ndarray) -> str:
    """Encode a (H, W) mask (non-zero = defect) as a Kaggle RLE string; ``""`` when empty."""
    m = np.asarray(mask) != 0
    h = m.shape[0]
    cols = np.flatnonzero(m.any(0))
    if cols.size == 0:
        return ""
    c0 = int(cols[0])
    m = m[:, c0 : int(cols[-1]) + 1]  # only the column span that holds defect pixels
    # vertical transitions, row-major: row r of `t` is the boundary above image row r (r = h: below the last)
    t = np.empty((h + 1, m.shape[1]), bool)
    t[0], t[h] = m[0], m[h - 1]
    np.not_equal(m[1:], m[:-1], out=t[1:h])
    flat = np.flatnonzero(t)  # 1-D search: much faster than np.nonzero on 2-D
    r, c = np.divmod(flat, m.shape[1])
    pos = np.sort((c + c0) * h + r)  # column-major boundary positions: start, end, start, end, ...
    starts, ends = pos[0::2], pos[1::2]
    keep = starts[1:] != ends[:-1]  # a run going on at the top of the next column is one run
    starts = starts[np.concatenate([[True], keep])]
    ends = ends[np.concatenate([keep, [True]])]
    pairs = np.empty(2 * starts.size, np.int64)
    pairs[0::2], pairs[1::2] = starts + 1, ends - starts
    return str(pairs.tolist())[1:-1].replace(",", "")  # list repr is formatted in C


def parse(rle: str | float | None, shape: tuple[int, int] = KAGGLE_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """Parse and validate an RLE string into (starts, lengths), 0-indexed starts; raise ValueError."""
    if rle is None or (isinstance(rle, float) and np.isnan(rle)):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if not isinstance(rle, str):
        raise ValueError(f"RLE must be a string, got {type(rle).__name__}")
    try:
        with warnings.catch_warnings():  # numpy warns (here: raises) when a token is not an integer
            warnings.simplefilter("error", DeprecationWarning)
            values = np.fromstring(rle, dtype=np.int64, sep=" ")
    except (DeprecationWarning, ValueError):
        bad = next((t for t in rle.split() if not t.lstrip("-").isdigit()), rle)
        raise ValueError(f"RLE has a non-integer token {bad!r}") from None
    if values.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if values.size % 2:
        raise ValueError(f"RLE has an odd number of values ({values.size}); expected start/length pairs")
    starts, lengths = values[0::2], values[1::2]
    if (starts < 1).any():
        raise ValueError(
            f"RLE start {int(starts[starts < 1][0])} is not positive (pixels are numbered from 1)"
        )
    if (lengths < 1).any():
        raise ValueError(f"RLE run length {int(lengths[lengths < 1][0])} is not positive")
    ends = starts + lengths  # 1-indexed, exclusive
    if (np.diff(starts) <= 0).any():
        i = int(np.flatnonzero(np.diff(starts) <= 0)[0])
        raise ValueError(f"RLE starts are not sorted: {int(starts[i])} then {int(starts[i + 1])}")
    if (ends[:-1] > starts[1:]).any():
        i = int(np.flatnonzero(ends[:-1] > starts[1:])[0])
        raise ValueError(
            f"RLE runs overlap: run at {int(starts[i])} (length {int(lengths[i])}) reaches past {int(starts[i + 1])}"
        )
    n = int(shape[0]) * int(shape[1])
    if ends[-1] - 1 > n:
        raise ValueError(
            f"RLE run at {int(starts[-1])} (length {int(lengths[-1])}) ends past the last pixel {n} of a {shape[0]}x{shape[1]} image"
        )
    return starts - 1, lengths


def decode(rle: str | float | None, shape: tuple[int, int] = KAGGLE_SHAPE) -> np.ndarray:
    """Decode a Kaggle RLE string into a (H, W) uint8 mask of 0/1; raise ValueError if malformed."""
    starts, lengths = parse(rle, shape)
    h, w = int(shape[0]), int(shape[1])
    out = np.zeros(h * w, np.uint8)
    if starts.size:
        # column-major pixel indices of every run, without a loop: offsets within runs + run starts
        first = np.cumsum(lengths) - lengths
        idx = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - first, lengths)
        out[(idx % h) * w + idx // h] = 1
    return out.reshape(h, w)


def area(rle: str | float | None, shape: tuple[int, int] = KAGGLE_SHAPE) -> int:
    """Number of defect pixels of an RLE string (validated)."""
    return int(parse(rle, shape)[1].sum())
