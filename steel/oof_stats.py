"""Sufficient statistics of an OOF store for the threshold sweep, per (class, pixel threshold, component size).

Post-processing a class (``steel.postprocess``) keeps a mask made of the pixels ``>= pixel`` whose
8-connected component has ``size * s**2 >= min_component`` (s: the store's stride), and drops the whole
mask unless ``cls >= label`` and its area ``* s**2 >= min_area``. Its Dice against the truth therefore only
needs, per image: the kept area and its intersection with the truth (for each pixel threshold and component
size), the truth area and the class probability. ``Stats`` holds exactly these, plus every image's fold:

  * ``kept_area`` / ``kept_inter`` (4, P, K, N) int32: area and intersection of the mask at pixel threshold
    ``pixel[j]`` after removing the components smaller than ``comp[k]`` (``comp[0] = 0``);
  * ``ge_all`` / ``ge_true`` (N, 4, 257) int32: pixels (all / truth) at or above each quantised level (a
    reverse cumulative histogram), so the area and intersection at *any* pixel threshold without component
    removal are one lookup; ``true_area`` (4, N) is ``ge_true[:, :, 0]``;
  * ``cls`` (N, 4) float32, ``folds`` (N,) int64.

Areas are in full-resolution pixels. A strided store keeps 1 pixel in s**2: 1-px lines at odd columns vanish
from it and thin ones look twice as large, so thresholds tuned on it would not hold at full resolution. When
the store has the full-resolution level histograms its writer took (``OOFStore.full_hist``), areas,
intersections and truth areas come from them (``full_res``): exact at full resolution whenever no component
is removed; the area a component size removes is the strided one times s**2. Without them, areas are the
strided counts times s**2, and the statistics equal ``steel.postprocess`` on the store itself.

They are computed once by streaming over the memory-mapped store (``compute_stats``) and cached beside it
as ``oof/stats-<key>.npz`` (``load_or_compute_stats``). ``LevelComponents`` gives the same numbers at any
pixel threshold and component size, labelling a (class, threshold) once on first use (for ``--search tpe``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from steel import N_CLASSES
from steel.io import atomic_path
from steel.oof import OOFStore
from steel.postprocess import pixel_thresholds

STATS_VERSION = 3
# Probability of each quantised level exactly as OOFStore.probs / postprocess compute it (float32 q / 255).
LEVELS = np.arange(256, dtype=np.float32) / np.float32(255.0)
# Pixels per OpenCV labelling call: masks are stacked into one image of about this size (16 MB of labels).
LABEL_BATCH_PIXELS = 4_000_000


def level_index(pixel: np.ndarray, cls: np.ndarray | None = None) -> np.ndarray:
    """Smallest quantised level q with ``LEVELS[q] (* cls) >= pixel`` (256: none), as post-processing decides.

    pixel (P,) -> (P,) for hard mode; with cls (...,) float32 (soft mode: ``prob * cls >= pixel``) ->
    (..., P). Comparisons in float32, like ``steel.postprocess``.
    """
    pix = np.asarray(pixel, dtype=np.float64).astype(np.float32)
    if cls is None:
        return np.searchsorted(LEVELS, pix, side="left").astype(np.int64)
    cls = np.asarray(cls, dtype=np.float32)
    out = np.empty((*cls.shape, len(pix)), dtype=np.int64)
    for j, t in enumerate(pix):  # LEVELS[q] * cls is non-decreasing in q: count the levels below t
        out[..., j] = (LEVELS * cls[..., None] < t).sum(-1)
    return out


def image_levels(pixel: np.ndarray, cls: np.ndarray, mode: str, scale: float = 0.0) -> np.ndarray:
    """Quantised level (..., P) of every image at pixel thresholds (P,), as ``steel.postprocess`` decides in
    ``mode``: cls (...,) the images' class probabilities (soft and scaled modes depend on them; scaled: the
    threshold ``pixel_thresholds(pixel, cls, scale)`` in float32). Hard (or scaled with scale 0) -> the same
    level for every image, broadcast."""
    cls = np.asarray(cls, dtype=np.float32)
    if mode == "soft":
        return level_index(pixel, cls)
    pix = np.asarray(pixel, dtype=np.float64).astype(np.float32)
    if mode == "hard" or scale == 0:
        return np.broadcast_to(level_index(pix), (*cls.shape, len(pix)))
    t = pixel_thresholds(pix, cls[..., None], np.float64(scale).astype(np.float32))  # (..., P) float32
    return np.searchsorted(LEVELS, t, side="left").astype(np.int64)


@dataclass(frozen=True)
class Stats:
    """Sufficient statistics of one OOF store for a pixel-threshold grid (P,) and component grid (K,)."""

    pixel: np.ndarray  # (P,) float64, increasing
    comp: np.ndarray  # (K,) float64, increasing, comp[0] = 0 (full-resolution pixels)
    stride: int
    mode: str  # hard | soft | scaled
    full_res: bool  # areas from the store's full-resolution histograms
    kept_area: np.ndarray  # (4, P, K, N) int32, full-resolution pixels
    kept_inter: np.ndarray  # (4, P, K, N) int32
    ge_all: np.ndarray  # (N, 4, 257) int32
    ge_true: np.ndarray  # (N, 4, 257) int32
    cls: np.ndarray  # (N, 4) float32
    folds: np.ndarray  # (N,) int64
    scale: float = 0.0  # scaled mode: the one scale these statistics are for (0 otherwise)

    @property
    def n(self) -> int:
        return len(self.cls)

    @property
    def s2(self) -> int:
        """Full-resolution pixels per store pixel (component sizes are counted at the store's stride)."""
        return self.stride * self.stride

    @property
    def true_area(self) -> np.ndarray:
        """(4, N) truth area in store pixels."""
        return np.ascontiguousarray(self.ge_true[:, :, 0].T)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every field as an array (for ``np.savez``)."""
        return {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_arrays(cls, z: dict[str, np.ndarray]) -> Stats:
        kw = {f.name: z[f.name] for f in fields(cls)}
        return cls(
            **{
                **kw,
                "stride": int(kw["stride"]),
                "mode": str(kw["mode"]),
                "full_res": bool(kw["full_res"]),
                "scale": float(kw["scale"]),
            }
        )


# ----------------------------------------------------------------------------------------- labelling
def bounding_boxes(masks: np.ndarray) -> np.ndarray:
    """Bounding boxes (n, 4) [r0, r1, c0, c1) of bool masks (n, h, w); an empty mask gets an empty box."""
    n, h, w = masks.shape
    rows, cols = masks.any(2), masks.any(1)
    box = np.stack(
        [rows.argmax(1), h - rows[:, ::-1].argmax(1), cols.argmax(1), w - cols[:, ::-1].argmax(1)], 1
    )
    box[~rows.any(1)] = 0
    return box.astype(np.int64)


def _label(buf: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(count incl. background, labels, stats) of a uint8 image: 8-connectivity, OpenCV's Grana (BBDT)."""
    nlab, labels, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(buf, 8, cv2.CV_32S, cv2.CCL_GRANA)
    return nlab, labels, stats


def label_planes(
    q: np.ndarray,
    truth: np.ndarray,
    level: np.ndarray,
    on_batch: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-connected components of the masks ``q[i] >= level[i]`` -> (plane, size, intersection with the
    truth), int64, one entry per component.

    q (n, h, w) uint8 quantised probabilities, truth (n, h, w) bool. Each mask is cropped to its bounding box;
    the crops are stacked (a zero row between them) into images of about ``LABEL_BATCH_PIXELS``, each
    labelled by one OpenCV call; a component belongs to the crop whose band holds its top row.
    ``on_batch(labels, stats, planes, tops, boxes)`` sees each labelled image (component c: ``stats[c]``,
    in the band of ``planes[j]`` starting at row ``tops[j]``).
    """
    level = np.asarray(level, np.int64)
    boxes = bounding_boxes(q >= level.astype(np.int16).reshape(-1, 1, 1))
    planes = np.flatnonzero(boxes[:, 1] > boxes[:, 0])
    has_truth = truth.any((1, 2))
    heights, widths = boxes[planes, 1] - boxes[planes, 0], boxes[planes, 3] - boxes[planes, 2]
    out_p, out_size, out_inter = [], [], []
    start = 0
    while start < len(planes):
        cost = np.cumsum(heights[start:] + 1) * np.maximum.accumulate(widths[start:])
        stop = start + max(1, int(np.searchsorted(cost, LABEL_BATCH_PIXELS, side="right")))
        sel = planes[start:stop]
        width = int(widths[start:stop].max())
        tops = np.concatenate([[0], np.cumsum(heights[start:stop] + 1)[:-1]])
        buf = np.zeros((int((heights[start:stop] + 1).sum()), width), np.uint8)
        view = buf.view(bool)
        idx = [np.zeros(0, np.int64)]  # truth pixels, as flat indices into buf
        for i, top in zip(sel.tolist(), tops.tolist()):
            r0, r1, c0, c1 = boxes[i].tolist()
            np.greater_equal(q[i, r0:r1, c0:c1], level[i], out=view[top : top + r1 - r0, : c1 - c0])
            if has_truth[i]:
                rr, cc = np.nonzero(truth[i, r0:r1, c0:c1])
                idx.append((rr + top) * width + cc)
        nlab, labels, stats = _label(buf)
        tidx = np.concatenate(idx)
        inter = (
            np.bincount(labels.reshape(-1)[tidx], minlength=nlab) if len(tidx) else np.zeros(nlab, np.int64)
        )
        out_p.append(sel[np.searchsorted(tops, stats[1:, cv2.CC_STAT_TOP], side="right") - 1])
        out_size.append(stats[1:, cv2.CC_STAT_AREA].astype(np.int64))
        out_inter.append(inter[1:])
        if on_batch is not None:
            on_batch(labels, stats, sel, tops, boxes)
        start = stop
    if not out_p:
        return (np.zeros(0, np.int64),) * 3
    return np.concatenate(out_p), np.concatenate(out_size), np.concatenate(out_inter)


class _Atlas:
    """The large components of many planes, each with its own pixels only, packed side by side into one image.

    Components of different planes, or disjoint components of one plane, never touch again at higher
    thresholds (those components lie inside them), so the packed image can be labelled at every higher
    threshold instead of the planes: it holds only the pixels that matter. ``add`` takes a labelled batch
    (see ``label_planes``); ``grade`` (n, 256) uint8 maps a plane's quantised level to the number of its
    grid thresholds at or below it, so the atlas at threshold j is ``grade >= j + 1`` whatever the plane.
    """

    def __init__(self, q: np.ndarray, truth: np.ndarray, grade: np.ndarray, large_min: int) -> None:
        self.q, self.truth, self.grade, self.large_min = q, truth, grade, large_min
        self.pieces: list[tuple[int, np.ndarray, np.ndarray]] = []  # (plane, grade crop, truth crop)

    def add(
        self, labels: np.ndarray, stats: np.ndarray, planes: np.ndarray, tops: np.ndarray, boxes: np.ndarray
    ) -> None:
        big = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= self.large_min)
        big = big[big > 0]
        band = np.searchsorted(tops, stats[big, cv2.CC_STAT_TOP], side="right") - 1
        for lab, j in zip(big.tolist(), band.tolist()):  # one piece per large component
            x, y, w, h = stats[lab, :4].tolist()
            i = int(planes[j])
            r0, c0 = y - int(tops[j]) + int(boxes[i, 0]), x + int(boxes[i, 2])
            own = labels[y : y + h, x : x + w] == lab
            g = np.where(own, self.grade[i][self.q[i, r0 : r0 + h, c0 : c0 + w]], 0).astype(np.uint8)
            self.pieces.append((i, g, own & self.truth[i, r0 : r0 + h, c0 : c0 + w]))

    def pack(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """-> (grade image, truth image, rectangle id image (-1 outside), plane of each rectangle)."""
        order = sorted(range(len(self.pieces)), key=lambda m: -self.pieces[m][1].shape[0])
        width = max(512, max(p[1].shape[1] for p in self.pieces) + 1)
        at, x, y, shelf = {}, 0, 0, 0
        for m in order:  # shelf packing, tallest first, a zero row / column around each piece
            h, w = self.pieces[m][1].shape
            if x + w + 1 > width:
                x, y, shelf = 0, y + shelf, 0
            at[m] = (y, x)
            x, shelf = x + w + 1, max(shelf, h + 1)
        g = np.zeros((y + shelf, width), np.uint8)
        t = np.zeros(g.shape, bool)
        rect = np.full(g.shape, -1, np.int32)
        for m, (_, gp, tp) in enumerate(self.pieces):
            (y0, x0), (h, w) = at[m], gp.shape
            g[y0 : y0 + h, x0 : x0 + w] = gp
            t[y0 : y0 + h, x0 : x0 + w] = tp
            rect[y0 : y0 + h, x0 : x0 + w] = m
        return g, t, rect, np.array([p[0] for p in self.pieces], np.int64)


# ----------------------------------------------------------------------------------------- statistics
def _ge(hist: np.ndarray) -> np.ndarray:
    """Reverse cumulative histogram (n, 256) -> (n, 257): count at or above each level, 0 above 255."""
    out = np.zeros((len(hist), 257), np.int64)
    out[:, :256] = np.cumsum(hist[:, ::-1], 1)[:, ::-1]
    return out


def histograms(q: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ge_all, ge_true) (n, 257) of planes q (n, h, w) uint8 and truth (n, h, w) bool."""
    n = len(q)
    h_all, h_true = np.zeros((n, 256), np.int64), np.zeros((n, 256), np.int64)
    t8 = truth.view(np.uint8)
    for i in range(n):  # OpenCV's histogram: one call per plane
        h_all[i] = cv2.calcHist([q[i]], [0], None, [256], [0, 256]).ravel()
        if truth[i].any():
            h_true[i] = cv2.calcHist([q[i]], [0], t8[i], [256], [0, 256]).ravel()
    return _ge(h_all), _ge(h_true)


def kept_counts(
    q: np.ndarray, truth: np.ndarray, qmin: np.ndarray, comp: np.ndarray, s2: int
) -> tuple[np.ndarray, ...]:
    """Statistics of planes q (n, h, w) at levels qmin (n, P), increasing, and component sizes comp (K,).

    -> (kept_area, kept_inter) (n, P, K) and (ge_all, ge_true) (n, 257). Every plane whose mask at its
    lowest threshold reaches ``comp[1]`` is labelled at that threshold. A component at a higher threshold lies
    inside one of those components, and inside one smaller than ``comp[1]`` everything is removed for every
    k >= 1: the higher thresholds are labelled only inside the large ones, packed into an ``_Atlas``.
    """
    p, k = qmin.shape[1], len(comp)
    ge_all, ge_true = histograms(q, truth)
    area = np.take_along_axis(ge_all, qmin, 1)  # (n, P)
    inter = np.take_along_axis(ge_true, qmin, 1)
    kept_area = np.repeat(area[:, :, None], k, 2)
    kept_inter = np.repeat(inter[:, :, None], k, 2)
    if k == 1:
        return kept_area, kept_inter, ge_all, ge_true
    kept_area[:, :, 1:] = 0  # a mask smaller than comp[1] is all small components
    kept_inter[:, :, 1:] = 0
    todo = np.flatnonzero(area[:, 0] * s2 >= comp[1])
    if len(todo) == 0:
        return kept_area, kept_inter, ge_all, ge_true
    grade = (np.arange(256)[None, None, :] >= qmin[todo, :, None]).sum(1).astype(np.uint8)  # (m, 256)
    atlas = _Atlas(q[todo], truth[todo], grade, large_min=-(-int(np.ceil(comp[1])) // s2))
    plane, size, cint = label_planes(q[todo], truth[todo], qmin[todo, 0], atlas.add)
    _accumulate(kept_area, kept_inter, todo[plane], np.zeros_like(plane), size, cint, comp, s2)
    if p > 1 and atlas.pieces:
        g, t, rect, rect_plane = atlas.pack()
        for j in range(1, p):
            mask = (g > j).view(np.uint8)
            nlab, labels, stats = _label(mask)
            tidx = np.flatnonzero(mask.view(bool) & t)
            cint = np.bincount(labels.reshape(-1)[tidx], minlength=nlab)[1:]
            where = rect[
                stats[1:, cv2.CC_STAT_TOP], stats[1:, cv2.CC_STAT_LEFT]
            ]  # box corner: in its rectangle
            size = stats[1:, cv2.CC_STAT_AREA].astype(np.int64)
            _accumulate(
                kept_area, kept_inter, todo[rect_plane[where]], np.full(len(size), j), size, cint, comp, s2
            )
    return kept_area, kept_inter, ge_all, ge_true


def _accumulate(
    kept_area: np.ndarray,
    kept_inter: np.ndarray,
    plane: np.ndarray,
    level: np.ndarray,
    size: np.ndarray,
    inter: np.ndarray,
    comp: np.ndarray,
    s2: int,
) -> None:
    """Add the components (plane, level index, size, intersection) at least comp[k] to kept_* [:, :, k]."""
    n, p, _ = kept_area.shape
    key = plane * p + level
    for kk in range(1, len(comp)):
        big = size * s2 >= comp[kk]
        kept_area[:, :, kk] += (
            np.bincount(key[big], weights=size[big], minlength=n * p).reshape(n, p).astype(np.int64)
        )
        kept_inter[:, :, kk] += (
            np.bincount(key[big], weights=inter[big], minlength=n * p).reshape(n, p).astype(np.int64)
        )


def _chunk(
    store: OOFStore, start: int, stop: int, qmin: np.ndarray, comp: np.ndarray
) -> tuple[np.ndarray, ...]:
    """``kept_counts`` of store rows [start, stop), every class; qmin (B, 4, P) -> arrays shaped (B, 4, ...)."""
    q = np.ascontiguousarray(store.masks[start:stop])
    t = np.ascontiguousarray(store.truth[start:stop]).view(bool)  # the writer stores 0 or 1
    b, c, h, w = q.shape
    res = kept_counts(
        q.reshape(b * c, h, w), t.reshape(b * c, h, w), qmin.reshape(b * c, -1), comp, store.stride**2
    )
    return tuple(r.reshape(b, c, *r.shape[1:]) for r in res)


def _full_res(
    store: OOFStore,
    a: int,
    b: int,
    qmin: np.ndarray,
    ka: np.ndarray,
    ki: np.ndarray,
    ga: np.ndarray,
    gt: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Strided counts of rows [a, b) (``_chunk``) -> full-resolution pixels (see the module docstring)."""
    s2 = store.stride**2
    if store.full_hist is None or s2 == 1:
        return ka * s2, ki * s2, ga * s2, gt * s2
    hist = np.asarray(store.full_hist[a:b], np.int64)  # (B, 2, 4, 256)
    fa, ft = (_ge(hist[:, i].reshape(-1, 256)).reshape(b - a, N_CLASSES, 257) for i in (0, 1))
    area, inter = np.take_along_axis(fa, qmin, 2), np.take_along_axis(ft, qmin, 2)  # (B, 4, P)
    kept = np.maximum(area[..., None] - s2 * (ka[..., :1] - ka), 0)
    kept_i = np.clip(inter[..., None] - s2 * (ki[..., :1] - ki), 0, kept)
    return kept, kept_i, fa, ft


def _check_grids(pixel: np.ndarray, comp: np.ndarray) -> None:
    if (
        len(pixel) == 0
        or len(comp) == 0
        or comp[0] != 0
        or np.any(np.diff(comp) <= 0)
        or np.any(np.diff(pixel) <= 0)
    ):
        raise ValueError("statistics: grids must be increasing and the component grid must start at 0")


def compute_stats(
    store: OOFStore,
    pixel: np.ndarray,
    comp: np.ndarray,
    mode: str = "hard",
    workers: int = 1,
    chunk: int = 32,
    progress: bool = True,
    scale: float = 0.0,
) -> Stats:
    """Statistics of ``store`` for pixel thresholds (P,) and component sizes (K,) in ``mode`` (scaled: at one
    ``scale``), streamed in chunks of ``chunk`` images by ``workers`` threads (OpenCV and numpy release the
    GIL; threads end with the process).
    """
    pixel, comp = np.asarray(pixel, np.float64), np.asarray(comp, np.float64)
    _check_grids(pixel, comp)
    if mode == "scaled" and scale == 0:  # the same thresholds as hard mode
        mode = "hard"
    n, p, k = len(store), len(pixel), len(comp)
    cls = np.asarray(store.cls, dtype=np.float32)
    # (N, 4, P), increasing in P for every image: soft and scaled levels depend on the class probability
    qmin = image_levels(pixel, cls, mode, scale)
    kept_area = np.zeros((N_CLASSES, p, k, n), np.int32)
    kept_inter = np.zeros((N_CLASSES, p, k, n), np.int32)
    ge_all = np.zeros((n, N_CLASSES, 257), np.int32)
    ge_true = np.zeros((n, N_CLASSES, 257), np.int32)
    starts = list(range(0, n, chunk))
    bar = tqdm(total=n, desc="sweep statistics", unit="img", disable=not progress, dynamic_ncols=True)

    def run(a: int) -> int:
        b = min(n, a + chunk)
        ka, ki, ga, gt = _full_res(
            store, a, b, qmin[a:b], *_chunk(store, a, b, np.ascontiguousarray(qmin[a:b]), comp)
        )
        kept_area[:, :, :, a:b] = ka.transpose(1, 2, 3, 0)
        kept_inter[:, :, :, a:b] = ki.transpose(1, 2, 3, 0)
        ge_all[a:b], ge_true[a:b] = ga, gt
        return b - a

    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # parallel over chunks instead: OpenCV's own threads would compete with ours
    try:
        if workers > 1 and len(starts) > 1:
            with ThreadPoolExecutor(min(workers, len(starts)), thread_name_prefix="steel-stats") as ex:
                for done in ex.map(run, starts):
                    bar.update(done)
        else:
            for a in starts:
                bar.update(run(a))
    finally:
        cv2.setNumThreads(cv2_threads)
        bar.close()
    full_res = store.full_hist is not None and store.stride > 1
    return Stats(pixel, comp, store.stride, mode, full_res, kept_area, kept_inter, ge_all, ge_true, cls,
                 np.asarray(store.folds, dtype=np.int64), float(scale))  # fmt: skip


def store_fingerprint(store: OOFStore) -> str:
    """Identity of a store's content as written (sizes and modification times of its files)."""
    files = {}
    for name in ("masks.npy", "truth.npy", "cls.npy", "index.csv", "meta.json", "hist.npy"):
        if name == "hist.npy" and store.full_hist is None:
            continue
        st = (store.dir / name).stat()
        files[name] = [st.st_size, st.st_mtime_ns]
    return hashlib.sha1(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def stats_key(store: OOFStore, pixel: np.ndarray, comp: np.ndarray, mode: str, scale: float = 0.0) -> str:
    """Cache key of the statistics of a store for a grid and mode (and scale, in scaled mode)."""
    ident = {"v": STATS_VERSION, "pixel": np.asarray(pixel, np.float64).tolist(),
             "comp": np.asarray(comp, np.float64).tolist(), "mode": mode, "store": store_fingerprint(store)}  # fmt: skip
    if mode == "scaled":
        ident["scale"] = float(scale)
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def load_or_compute_stats(
    store: OOFStore,
    pixel: np.ndarray,
    comp: np.ndarray,
    mode: str = "hard",
    workers: int = 1,
    progress: bool = True,
    scale: float = 0.0,
) -> tuple[Stats, Path]:
    """Cached statistics (``oof/stats-<key>.npz``, written atomically) -> (stats, cache path). Scaled mode at
    scale 0 is hard mode: its statistics are hard mode's (one cache).

    A store that cannot be written to gets its cache in the temp dir; a damaged cache is recomputed.
    """
    if mode == "scaled" and scale == 0:
        mode = "hard"
    scale = float(scale) if mode == "scaled" else 0.0
    key = stats_key(store, np.asarray(pixel, np.float64), np.asarray(comp, np.float64), mode, scale)
    path = store.dir / f"stats-{key}.npz"
    if not os.access(store.dir, os.W_OK):
        path = Path(tempfile.gettempdir()) / f"steel-stats-{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return Stats.from_arrays({k: z[k] for k in z.files}), path
        except (OSError, ValueError, KeyError):
            pass  # damaged or from another version: recompute
    stats = compute_stats(store, pixel, comp, mode, workers=workers, progress=progress, scale=scale)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **stats.arrays())
    return stats, path


# ------------------------------------------------------------------------------ any threshold (TPE)
@dataclass(frozen=True)
class Components:
    """One class at one pixel threshold: area / intersection (N,) (full-resolution pixels) and the components
    below a bound (image, size and intersection at the store's stride)."""

    area: np.ndarray  # (N,) int64
    inter: np.ndarray  # (N,) int64
    image: np.ndarray  # (M,) image of each component smaller than the bound
    size: np.ndarray  # (M,) store pixels
    size_inter: np.ndarray  # (M,)

    def kept(self, min_component: float, s2: int) -> tuple[np.ndarray, np.ndarray]:
        """(kept area, kept intersection) (N,) after removing components with ``size * s2 < min_component``."""
        small = self.size.astype(np.int64) * s2 < min_component
        n = len(self.area)
        rem_a = np.bincount(self.image[small], weights=self.size[small], minlength=n).astype(np.int64)
        rem_i = np.bincount(self.image[small], weights=self.size_inter[small], minlength=n).astype(np.int64)
        kept = np.maximum(self.area - s2 * rem_a, 0)
        return kept, np.clip(self.inter - s2 * rem_i, 0, kept)


@dataclass(frozen=True)
class _Strip:
    """Components stacked one under the other (a zero row after each): their quantised levels, truth and the
    image each row belongs to (-1: a separator row)."""

    q: np.ndarray  # (R, W) uint8
    truth: np.ndarray  # (T,) int64 flat indices of the truth pixels
    row_image: np.ndarray  # (R,) int64


def _strips(
    labels: np.ndarray, stats: np.ndarray, planes: np.ndarray, tops: np.ndarray, boxes: np.ndarray,
    q: np.ndarray, truth: np.ndarray, image: np.ndarray,
) -> list[_Strip]:  # fmt: skip
    """Every component of a labelled batch (see ``label_planes``), each cut out with its own pixels only, in
    strips of components of similar width (powers of 2). ``image``: global image index of each plane."""
    width_buf = labels.shape[1]
    fg = np.flatnonzero(labels.reshape(-1))
    lab = labels.reshape(-1)[fg]
    r, col = np.divmod(fg, width_buf)
    band = np.searchsorted(tops, r, side="right") - 1
    plane = planes[band]
    pr, pc = r - tops[band] + boxes[plane, 0], col + boxes[plane, 2]
    left, top, w, h = (stats[:, i].astype(np.int64) for i in range(4))
    comp_image = np.full(len(stats), -1, np.int64)
    comp_image[lab] = image[plane]
    group = np.ceil(np.log2(np.maximum(w, 1))).astype(np.int64)
    group[0] = -1  # the background
    out = []
    for g in np.unique(group[1:]).tolist():
        comps = np.flatnonzero(group == g)
        start = np.zeros(len(stats), np.int64)
        start[comps] = np.concatenate([[0], np.cumsum(h[comps] + 1)[:-1]])
        rows, width = int((h[comps] + 1).sum()), int(w[comps].max())
        sq = np.zeros((rows, width), np.uint8)
        mine = group[lab] == g
        pos = (start[lab[mine]] + r[mine] - top[lab[mine]]) * width + col[mine] - left[lab[mine]]
        sq.reshape(-1)[pos] = q[plane[mine], pr[mine], pc[mine]]
        row_image = np.repeat(comp_image[comps], h[comps] + 1)
        row_image[np.cumsum(h[comps] + 1) - 1] = -1
        out.append(_Strip(sq, pos[truth[plane[mine], pr[mine], pc[mine]]], row_image))
    return out


def _merge_strips(strips: list[_Strip], rows: int = 4096) -> list[_Strip]:
    """Strips of one width class (power of 2) put one under the other, up to about ``rows`` rows each."""
    out = []
    for g in sorted({int(np.ceil(np.log2(s.q.shape[1]))) for s in strips}):
        same = [s for s in strips if int(np.ceil(np.log2(s.q.shape[1]))) == g]
        while same:
            take, n = [], 0
            while same and (not take or n + len(same[0].row_image) <= rows):
                take.append(same.pop(0))
                n += len(take[-1].row_image)
            w = max(s.q.shape[1] for s in take)
            top = np.concatenate([[0], np.cumsum([len(s.row_image) for s in take])[:-1]])
            truth = [(t + s.truth // s.q.shape[1]) * w + s.truth % s.q.shape[1] for s, t in zip(take, top)]
            out.append(_Strip(np.concatenate([np.pad(s.q, ((0, 0), (0, w - s.q.shape[1]))) for s in take]),
                              np.concatenate(truth), np.concatenate([s.row_image for s in take])))  # fmt: skip
    return out


class LevelComponents:
    """Components of any (class, pixel threshold) of a store, labelled on first use and kept in memory.

    ``bound``: only components with ``size * s**2 < bound`` are kept (larger ones are never removed by a
    ``min_component <= bound``). ``get(c, pixel)`` -> ``Components``; hard mode memoises by quantised level.
    ``base`` (per class, a pixel threshold): the first use of a class labels its masks at ``base`` once and
    keeps every component with its own pixels, packed (``_Strip``); a threshold at or above ``base`` has its
    components inside those, so it is labelled on the packed strips only (a few percent of the pixels of
    noisy maps) instead of the planes.
    """

    def __init__(
        self, store: OOFStore, stats: Stats, mode: str, bound: float, workers: int = 1,
        base: list[float] | None = None, keep: int = 256,
    ) -> None:  # fmt: skip
        self.store, self.stats, self.mode, self.workers = store, stats, mode, workers
        self.bound, self.base = float(bound), base
        self.s2 = store.stride**2
        self.keep = keep  # (class, threshold) entries kept in memory, least recently used dropped first
        self._memo: dict[tuple, Components] = {}
        self._strips: dict[int, tuple[np.ndarray, list[_Strip]]] = {}  # class -> (base levels, strips)

    def levels(self, c: int, pixel: float) -> np.ndarray:
        """Per-image quantised level (N,) of class c (0-based) at a pixel threshold (the statistics' scale)."""
        return np.array(
            image_levels(np.array([pixel]), self.stats.cls[:, c], self.mode, self.stats.scale)[:, 0]
        )

    def get(self, c: int, pixel: float) -> Components:
        lv = self.levels(c, pixel)
        same = self.mode == "hard" or (self.mode == "scaled" and self.stats.scale == 0)
        key = (c, int(lv[0])) if same else (c, float(np.float32(pixel)))
        hit = self._memo.pop(key, None)
        if hit is None:
            hit = self._compute(c, lv)
            while len(self._memo) >= self.keep:
                self._memo.pop(next(iter(self._memo)))
        self._memo[key] = hit  # most recently used last
        return hit

    def _map(self, fn: Callable, items: list) -> list:
        if self.workers > 1 and len(items) > 1:
            with ThreadPoolExecutor(min(self.workers, len(items)), thread_name_prefix="steel-levels") as ex:
                return list(ex.map(fn, items))
        return [fn(x) for x in items]

    def _class_strips(self, c: int) -> tuple[np.ndarray, list[_Strip]]:
        if c not in self._strips:
            base = self.levels(c, self.base[c])
            todo = np.flatnonzero(self.stats.ge_all[np.arange(self.stats.n), c, base] > 0)

            def part(idx: np.ndarray) -> list[_Strip]:
                q = np.ascontiguousarray(self.store.masks[idx, c])
                t = np.ascontiguousarray(self.store.truth[idx, c]).view(bool)
                out: list[_Strip] = []
                label_planes(q, t, base[idx], lambda *b: out.extend(_strips(*b, q, t, idx)))
                return out

            strips = [
                s for x in self._map(part, [todo[a : a + 64] for a in range(0, len(todo), 64)]) for s in x
            ]
            self._strips[c] = (base, _merge_strips(strips))
        return self._strips[c]

    def _compute(self, c: int, lv: np.ndarray) -> Components:
        rows = np.arange(self.stats.n)
        area = self.stats.ge_all[rows, c, lv].astype(np.int64)
        inter = self.stats.ge_true[rows, c, lv].astype(np.int64)
        if self.base is not None and np.all(lv >= np.maximum(self.levels(c, self.base[c]), 1)):  # (0 = all)
            parts = self._map(lambda s: self._label_strip(s, lv), self._class_strips(c)[1])
        else:
            todo = np.flatnonzero(area > 0)

            def part(idx: np.ndarray) -> tuple[np.ndarray, ...]:
                q = np.ascontiguousarray(self.store.masks[idx, c])
                t = np.ascontiguousarray(self.store.truth[idx, c]).view(bool)
                which, size, cint = label_planes(q, t, lv[idx])
                return self._small(idx[which], size, cint)

            parts = self._map(part, [todo[a : a + 64] for a in range(0, len(todo), 64)])
        if parts:
            image, size, cint = (np.concatenate(x) for x in zip(*parts))
        else:
            image = size = cint = np.zeros(0, np.int32)
        return Components(area, inter, image, size, cint)

    def _small(self, image: np.ndarray, size: np.ndarray, inter: np.ndarray) -> tuple[np.ndarray, ...]:
        small = size * self.s2 < self.bound
        return image[small].astype(np.int32), size[small].astype(np.int32), inter[small].astype(np.int32)

    def _label_strip(self, strip: _Strip, lv: np.ndarray) -> tuple[np.ndarray, ...]:
        thr = np.where(strip.row_image >= 0, lv[strip.row_image], 256).astype(np.int16)
        mask = (strip.q >= thr[:, None]).view(np.uint8)
        nlab, labels, stats = _label(mask)
        tidx = strip.truth[mask.reshape(-1)[strip.truth] != 0]
        inter = np.bincount(labels.reshape(-1)[tidx], minlength=nlab)[1:]
        image = strip.row_image[stats[1:, cv2.CC_STAT_TOP]]
        return self._small(image, stats[1:, cv2.CC_STAT_AREA].astype(np.int64), inter)
