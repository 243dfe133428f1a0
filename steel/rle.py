"""Kaggle run-length encoding, vectorised.

Pixels are numbered from 1, top to bottom then left to right (column-major), and a string is
``"start length start length ..."``. An empty mask is the empty string.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import cv2
import numpy as np

from steel import KAGGLE_SHAPE


def encode(mask: np.ndarray) -> str:
    """Encode a (H, W) mask (non-zero = defect) as a Kaggle RLE string; ``""`` when empty."""
    m = np.asarray(mask)
    m = (
        m.view(np.uint8)
        if m.dtype in (np.bool_, np.int8)
        else m
        if m.dtype == np.uint8
        else (m != 0).view(np.uint8)
    )
    h = m.shape[0]
    cols = np.flatnonzero(m.any(0))
    if cols.size == 0:
        return ""
    c0 = int(cols[0])
    # the column span that holds defect pixels, column-major (cv2's transpose is vectorised), as one 1-D scan
    flat = cv2.transpose(m[:, c0 : int(cols[-1]) + 1]).reshape(-1) != 0
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # where a run starts or ends
    starts = edges[1::2] if flat[0] else edges[0::2]
    ends = edges[0::2] if flat[0] else edges[1::2]
    if flat[0]:
        starts = np.concatenate([[0], starts])
    if flat[-1]:
        ends = np.concatenate([ends, [flat.size]])
    pairs = np.empty(2 * starts.size, np.int64)
    pairs[0::2], pairs[1::2] = starts + c0 * h + 1, ends - starts
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
    return RunMasks.from_runs([(starts, starts + lengths)], shape).window(0, 0, *shape)[0]


def area(rle: str | float | None, shape: tuple[int, int] = KAGGLE_SHAPE) -> int:
    """Number of defect pixels of an RLE string (validated)."""
    return int(parse(rle, shape)[1].sum())


class RunMasks:
    """C masks of one (H, W) image kept as their RLE runs (0-indexed column-major [start, end) pairs), decoded
    on demand: ``window`` decodes only the columns a crop covers, and empty masks cost nothing.

    ``RunMasks(rles, shape)`` parses and validates C Kaggle strings (ValueError like ``decode``).
    """

    def __init__(self, rles: Sequence[str | float | None], shape: tuple[int, int]) -> None:
        runs = []
        for r in rles:
            starts, lengths = parse(r, shape)
            runs.append((starts, starts + lengths))
        self._set(runs, shape)

    @classmethod
    def from_runs(cls, runs: Sequence[tuple[np.ndarray, np.ndarray]], shape: tuple[int, int]) -> RunMasks:
        """From already validated (starts, ends) pairs of 0-indexed column-major pixel numbers."""
        self = cls.__new__(cls)
        self._set(runs, shape)
        return self

    def _set(self, runs: Sequence[tuple[np.ndarray, np.ndarray]], shape: tuple[int, int]) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.runs = list(runs)
        self.areas = np.array([int((e - s).sum()) for s, e in self.runs], np.int64)
        self.present = np.flatnonzero(self.areas)  # classes with pixels

    def __len__(self) -> int:
        return len(self.runs)

    def pixel(self, c: int, k: int) -> tuple[int, int]:
        """(y, x) of the k-th pixel (0 <= k < ``areas[c]``, column-major order) of mask c."""
        starts, ends = self.runs[c]
        before = np.cumsum(ends - starts)  # pixels up to and including each run
        i = int(np.searchsorted(before, k, side="right"))
        p = int(starts[i]) + k - int(before[i] - (ends[i] - starts[i]))
        return p % self.shape[0], p // self.shape[0]

    def _window_spans(self, x0: int, w: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(class, starts, ends) of each mask with pixels in columns x0:x0+w: its runs clipped to the window's
        column-major pixel numbers (one span: [x0 * H, (x0 + w) * H)) and shifted to start at 0."""
        lo, hi = x0 * self.shape[0], (x0 + w) * self.shape[0]
        for c in self.present:
            starts, ends = self.runs[c]
            i0, i1 = np.searchsorted(ends, lo, side="right"), np.searchsorted(starts, hi, side="left")
            if i0 < i1:
                yield int(c), np.maximum(starts[i0:i1], lo) - lo, np.minimum(ends[i0:i1], hi) - lo

    def packed_window(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """uint8 (h, w) of rows y0:y0+h and columns x0:x0+w with bit c set where mask c is (``pack_masks`` of
        ``window``, C <= 8), decoded straight into the bits."""
        H = self.shape[0]
        cols = None
        for c, s, e in self._window_spans(x0, w):
            if cols is None:
                cols = np.zeros(w * H, np.uint8)  # column-major buffer of the window's columns
            cols[s[0] : e[-1]] |= _segments(s, e, 1 << c)
        if cols is None:
            return np.zeros((h, w), np.uint8)
        return cv2.transpose(cols.reshape(w, H)[:, y0 : y0 + h])  # (w, h) -> (h, w), vectorised

    def window(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Masks (C, h, w) uint8 0/1 of rows y0:y0+h and columns x0:x0+w (inside the image)."""
        H = self.shape[0]
        out = np.zeros((len(self.runs), h, w), np.uint8)
        cols = np.empty(w * H, np.uint8)  # column-major buffer of the window's columns
        for c, s, e in self._window_spans(x0, w):
            cols[: s[0]] = 0
            cols[s[0] : e[-1]] = _segments(s, e, 1)
            cols[e[-1] :] = 0
            cv2.transpose(cols.reshape(w, H)[:, y0 : y0 + h], dst=out[c])  # (w, h) -> (h, w), vectorised
        return out

    def decode(self) -> np.ndarray:
        """All masks (C, H, W) uint8 0/1."""
        return self.window(0, 0, *self.shape)


def _segments(s: np.ndarray, e: np.ndarray, value: int) -> np.ndarray:
    """uint8 (e[-1] - s[0],): ``value`` on the runs [s, e) and 0 in the gaps between them (runs sorted,
    disjoint), as alternating segments expanded by one ``np.repeat``."""
    counts = np.empty(2 * s.size - 1, np.int64)
    counts[0::2], counts[1::2] = e - s, s[1:] - e[:-1]
    vals = np.zeros(counts.size, np.uint8)
    vals[0::2] = value
    return np.repeat(vals, counts)


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """Masks uint8 (C, H, W) 0/1, C <= 8 -> uint8 (H, W) with bit c set where mask c is."""
    out = np.zeros(masks.shape[1:], np.uint8)
    for c in np.flatnonzero(masks.any(axis=(1, 2))):  # a loop over the classes that have pixels
        out |= masks[c] << np.uint8(c)
    return out
