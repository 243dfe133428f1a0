"""Exact search of post-processing thresholds on OOF statistics (``steel.oof_stats``).

For one class at a fixed pixel threshold and component size, each image i has a Dice ``kept_i`` if its mask
is kept and ``drop_i`` (1 for an empty truth, else 0) if it is dropped; it is kept when ``cls_i >= label``
and ``area_i * s**2 >= min_area``. So the Dice sum of every (label, min_area) of a grid is the sum of
``drop`` plus a 2-D reverse cumulative sum of ``gain = kept - drop`` binned by (label bin, area bin): one
``bincount`` and two ``cumsum`` score the whole label x min-area grid (``fold_tables``; with a fold axis,
so that ``robust`` can be scored too).

Objectives (``objective``): ``mean`` = mean Dice over (image, class), a sum of per-class terms, so each
class's best point over its whole grid (pixel x component x label x min-area) is exact; ``robust`` = mean
over folds of the fold's mean Dice - k x their standard deviation, which does not split by class: it is
maximised by coordinate ascent over the classes (each step exact: a class's best point over its whole grid
given the others), from two starts (each class's mean-best and each class's own robust-best), the better
kept. That is a coordinate-wise optimum, not proven global.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from steel import N_CLASSES
from steel.metrics import dice_from_counts, dice_per_pair
from steel.oof import OOFStore
from steel.oof_stats import LevelComponents, Stats, image_levels
from steel.postprocess import ClassParams, Params, postprocess

OBJECTIVES = ("mean", "robust")
TIE = 1e-9  # dice sums closer than this count as equal: the earlier (smaller) parameters win


@dataclass(frozen=True)
class Folds:
    """Fold index (N,) of every image, 0..F-1, and the number of images of each fold (F,)."""

    index: np.ndarray
    count: np.ndarray

    @classmethod
    def of(cls, folds: np.ndarray) -> Folds:
        _, idx = np.unique(np.asarray(folds), return_inverse=True)
        return cls(idx.astype(np.int64), np.bincount(idx).astype(np.float64))

    @property
    def n(self) -> int:
        return len(self.count)


def objective_value(fold_sums: np.ndarray, folds: Folds, objective: str, robust_k: float) -> np.ndarray:
    """Objective of Dice sums per fold, summed over the 4 classes: (..., F) -> (...)."""
    if objective == "mean":
        return fold_sums.sum(-1) / (N_CLASSES * folds.count.sum())
    fold_mean = fold_sums / (N_CLASSES * folds.count)
    return fold_mean.mean(-1) - robust_k * fold_mean.std(-1)


def fold_tables(
    area: np.ndarray,
    inter: np.ndarray,
    true_area: np.ndarray,
    cls: np.ndarray,
    folds: Folds,
    labels: np.ndarray,
    min_areas: np.ndarray,
) -> np.ndarray:
    """Dice sums (L, A, F) of one class for every label threshold (L,) x min-area (A,), per fold.

    area / inter (..., N): kept area and intersection (full-resolution pixels) at one pixel threshold and component
    size (leading axes: several of them at once -> (..., L, A, F)); true_area, cls, folds.index (N,).
    """
    lab = np.asarray(labels, np.float64).astype(np.float32)
    keep_dice = dice_from_counts(inter, area, true_area)
    drop = (true_area == 0).astype(np.float64)
    gain = keep_dice - drop
    nl, na, nf = len(lab), len(min_areas), folds.n
    b = np.searchsorted(lab, np.asarray(cls, np.float32), side="right")  # image passes labels[:b]
    e = np.searchsorted(np.asarray(min_areas, np.float64), area.astype(np.float64), side="right")
    cell = (folds.index * (nl + 1) + b) * (na + 1) + e  # (..., N)
    lead = gain.shape[:-1]
    size = nf * (nl + 1) * (na + 1)
    offset = np.arange(int(np.prod(lead, dtype=np.int64))).reshape(*lead, 1) * size
    hist = np.bincount((cell + offset).ravel(), weights=gain.ravel(), minlength=size * offset.size)
    hist = hist.reshape(*lead, nf, nl + 1, na + 1)
    tail = np.flip(np.flip(hist, (-2, -1)).cumsum(-2).cumsum(-1), (-2, -1))  # sum over bins >= (x, y)
    base = np.bincount(folds.index, weights=drop, minlength=nf)
    out = tail[..., 1:, 1:] + base[:, None, None]  # (..., F, L, A)
    return np.moveaxis(out, -3, -1)


@dataclass(frozen=True)
class Candidates:
    """Every point of one class's grid with its Dice sum per fold: ``sums`` (M, F) and the point's params."""

    sums: np.ndarray
    pixel: np.ndarray  # (M,) values
    min_component: np.ndarray
    label: np.ndarray
    min_area: np.ndarray
    scale: np.ndarray | None = None  # scaled mode (None: 0)

    def params(self, m: int) -> ClassParams:
        return ClassParams(
            label=float(self.label[m]),
            pixel=float(self.pixel[m]),
            min_area=_num(self.min_area[m]),
            min_component=_num(self.min_component[m]),
            scale=0.0 if self.scale is None else float(self.scale[m]),
        )

    @classmethod
    def concat(cls, parts: list[Candidates]) -> Candidates:
        """One class's candidates of several statistics (scaled mode: one per scale), in order."""
        if len(parts) == 1:
            return parts[0]
        scales = [np.zeros(len(p.pixel)) if p.scale is None else p.scale for p in parts]
        cols = [
            np.concatenate([getattr(p, k) for p in parts])
            for k in ("sums", "pixel", "min_component", "label", "min_area")
        ]
        return cls(*cols, np.concatenate(scales))


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else float(v)


def grid_candidates(stats: Stats, c: int, dims: dict[str, Any], folds: Folds) -> Candidates:
    """All (pixel, component, label, min-area) points of class c's grid (``dims``: {key: Dim}) with fold sums.

    The pixel and component values must be in the statistics' grids (``sweep_grids`` makes them so).
    """
    pix = dims["pixel"].values()
    comp = dims["min_component"].values()
    j = [_grid_index(stats.pixel, v, "pixel threshold") for v in pix]
    k = [_grid_index(stats.comp, v, "component size") for v in comp]
    labels = np.asarray(dims["label"].values(), np.float64)
    areas = np.asarray(dims["min_area"].values(), np.float64)
    area = stats.kept_area[c][np.ix_(j, k)]  # (J, K, N)
    inter = stats.kept_inter[c][np.ix_(j, k)]
    t = stats.true_area[c]
    sums = fold_tables(area, inter, t, stats.cls[:, c], folds, labels, areas)  # (J, K, L, A, F)
    grids = [g.reshape(-1).astype(np.float64) for g in np.meshgrid(pix, comp, labels, areas, indexing="ij")]
    return Candidates(sums.reshape(-1, folds.n), *grids, np.full(len(grids[0]), float(stats.scale)))


def scaled_candidates(stats: list[Stats], c: int, dims: dict[str, Any], folds: Folds) -> Candidates:
    """``grid_candidates`` of class c over the statistics of each scale in its grid (scaled mode), or of the one
    statistics of hard / soft mode."""
    if stats[0].mode == "soft" or "scale" not in dims or len(stats) == 1:
        return grid_candidates(stats[0], c, dims, folds)
    want = [float(v) for v in dims["scale"].values()]
    return Candidates.concat([grid_candidates(s, c, dims, folds) for s in stats if float(s.scale) in want])


def _grid_index(grid: np.ndarray, v: float, what: str) -> int:
    hit = np.flatnonzero(np.abs(np.asarray(grid) - v) < 1e-9)
    if not len(hit):
        raise ValueError(f"{what} {v} is not in the statistics' grid {np.asarray(grid).tolist()}")
    return int(hit[0])


def _best(values: np.ndarray) -> int:
    """Index of the largest value; within ``TIE`` of it, the first."""
    return int(np.flatnonzero(values >= values.max() - TIE)[0])


@dataclass(frozen=True)
class Solution:
    """The chosen point of every class (index into its Candidates) and the objective value."""

    choice: tuple[int, ...]
    value: float


def solve(cands: list[Candidates], folds: Folds, objective: str = "mean", robust_k: float = 1.0) -> Solution:
    """Best point of each class under the objective (exact for ``mean``; coordinate ascent for ``robust``)."""
    mean_best = tuple(_best(c.sums.sum(1)) for c in cands)
    if objective == "mean":
        total = sum(c.sums[m] for c, m in zip(cands, mean_best))
        return Solution(mean_best, float(objective_value(total, folds, "mean", robust_k)))
    own_best = tuple(_best(objective_value(c.sums * N_CLASSES, folds, "robust", robust_k)) for c in cands)
    runs = [_ascent(cands, folds, start, robust_k) for start in (mean_best, own_best)]
    return max(runs, key=lambda s: s.value)


def _ascent(cands: list[Candidates], folds: Folds, start: tuple[int, ...], robust_k: float) -> Solution:
    choice = list(start)
    current = float(objective_value(sum(c.sums[m] for c, m in zip(cands, choice)), folds, "robust", robust_k))
    for _ in range(100):
        moved = False
        for ci, c in enumerate(cands):
            others = sum(x.sums[m] for i, (x, m) in enumerate(zip(cands, choice)) if i != ci)
            values = objective_value(c.sums + others, folds, "robust", robust_k)
            m = _best(values)
            if values[m] > current + TIE / (N_CLASSES * folds.count.sum()):
                choice[ci], current, moved = m, float(values[m]), True
        if not moved:
            break
    return Solution(tuple(choice), current)


def top_k(cand: Candidates, k: int) -> list[int]:
    """The k best points of one class by its Dice sum, one per distinct sum (ties: the first)."""
    total = cand.sums.sum(1)
    order = np.argsort(-total, kind="stable")
    out: list[int] = []
    for m in order.tolist():
        if all(abs(total[m] - total[o]) > TIE for o in out):
            out.append(m)
            if len(out) == k:
                break
    return out


# ------------------------------------------------------------------------------------ any parameters
class Evaluator:
    """Dice of any thresholds on a store's statistics: grid points from ``Stats``, thresholds without
    component removal from its histograms, anything else by labelling on demand (``LevelComponents``).

    ``stats``: one ``Stats``, or (scaled mode) one per scale; the first serves hard mode and scale 0.
    """

    def __init__(
        self, stats: Stats | list[Stats], store: OOFStore | None = None, bound: float = 0.0, workers: int = 1,
        base: list[float] | None = None,
    ) -> None:  # fmt: skip
        all_stats = [stats] if isinstance(stats, Stats) else list(stats)
        self.stats, self.store, self.workers, self.base = all_stats[0], store, workers, base
        self.by_scale = {float(s.scale): s for s in all_stats}
        self.folds = Folds.of(self.stats.folds)
        self.true_area = self.stats.true_area
        self._levels: dict[float, LevelComponents] = {}
        self._bound = float(bound)

    def stats_for(self, mode: str, scale: float = 0.0) -> Stats:
        """The statistics that hold thresholds of ``mode`` at ``scale`` (scaled mode at scale 0 is hard)."""
        key = float(scale) if mode == "scaled" else 0.0
        st = self.by_scale.get(key)
        want = "hard" if mode == "scaled" and key == 0 else mode
        if st is None or st.mode != want:
            have = ", ".join(f"{s.mode} scale {s.scale:g}" for s in self.by_scale.values())
            raise ValueError(f"no statistics for mode {mode} scale {scale:g} (have {have})")
        return st

    def kept(
        self, c: int, pixel: float, min_component: float, mode: str, scale: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """(kept area, kept intersection) (N,) of class c (0-based)."""
        st = self.stats_for(mode, scale)
        j = np.flatnonzero(np.abs(st.pixel - pixel) < 1e-9)
        k = np.flatnonzero(np.abs(st.comp - min_component) < 1e-9)
        if len(j) and len(k):
            return st.kept_area[c, j[0], k[0]].astype(np.int64), st.kept_inter[c, j[0], k[0]].astype(np.int64)
        if min_component <= st.s2:  # every component has size * s2 >= s2: nothing is removed
            rows = np.arange(st.n)
            lv = image_levels(np.array([pixel]), st.cls[:, c], st.mode, st.scale)[:, 0]
            return st.ge_all[rows, c, lv].astype(np.int64), st.ge_true[rows, c, lv].astype(np.int64)
        if self.store is None:
            raise ValueError(f"pixel {pixel} / min_component {min_component} are not in the statistics' grid")
        if self._bound <= min_component:
            self._bound = max(self._bound, float(min_component) + 1.0)
            self._levels.clear()
        levels = self._levels.get(float(st.scale))
        if levels is None:
            levels = LevelComponents(self.store, st, st.mode, self._bound, self.workers, self.base)
            self._levels[float(st.scale)] = levels
        return levels.get(c, pixel).kept(min_component, st.s2)

    def class_dice(self, c: int, p: ClassParams, mode: str) -> np.ndarray:
        """Dice (N,) of class c with thresholds p."""
        area, inter = self.kept(c, p.pixel, p.min_component, mode, p.scale)
        t = self.true_area[c]
        keep = (self.stats.cls[:, c] >= np.float32(p.label)) & (area >= p.min_area)
        return np.where(keep, dice_from_counts(inter, area, t), (t == 0).astype(np.float64))

    def per_pair(self, params: Params) -> np.ndarray:
        """Dice (N, 4) of every (image, class)."""
        return np.stack([self.class_dice(c, p, params.mode) for c, p in enumerate(params.classes)], 1)

    def objective(self, params: Params, objective: str, robust_k: float) -> float:
        d = self.per_pair(params).sum(1)
        return float(
            objective_value(np.bincount(self.folds.index, weights=d), self.folds, objective, robust_k)
        )

    def summary(self, params: Params) -> dict[str, Any]:
        """{'mean', 'per_class' [4], 'folds' [F]} Dice of a parameter set."""
        d = self.per_pair(params)
        fold = np.bincount(self.folds.index, weights=d.mean(1), minlength=self.folds.n) / self.folds.count
        return {"mean": float(d.mean()), "per_class": d.mean(0).tolist(), "folds": fold.tolist()}


def brute_force_dice(
    store: OOFStore, params: Params, rows: np.ndarray | list[int] | None = None
) -> np.ndarray:
    """Reference: ``steel.postprocess`` on every mask of ``rows`` of the store, scored -> Dice (n, 4)."""
    rows = np.arange(len(store)) if rows is None else np.asarray(rows)
    out = np.empty((len(rows), N_CLASSES))
    for i, r in enumerate(rows.tolist()):
        pred = postprocess(store.masks[r], store.cls[r], params, store.stride)
        out[i] = dice_per_pair(pred[None], store.truth[r][None])[0]
    return out
