"""`steel sweep RUN_DIR`: Optuna search of per-class post-processing thresholds on the OOF predictions.

A trial never re-thresholds a mask. Sufficient statistics are computed once per (image, class), streaming
over the memory-mapped OOF store, and cached in ``oof/stats-<hash>.npz``:
  * ``ge_all`` / ``ge_true`` (N, 4, 257): pixels (all / ground truth) with quantised probability >= q, i.e.
    reverse cumulative 256-bin histograms -> predicted area and intersection at any pixel threshold;
  * ``kept_area`` / ``kept_inter`` (N, 4, P, K): area and intersection left after removing 8-connected
    components smaller than each size of the component grid (K, full-res pixels, first = 0), at each pixel
    threshold of the sweep grid (P).
Dice of a parameter set is then a lookup + label gate + min-area gate over N images per class
(``FastDice``), exactly equal to post-processing every mask (``brute_force_dice``).

Sweep configs (sweeps/*.yaml, see ``DEFAULT_CONFIG``): trials, objective (mean | robust = mean over folds
- k * std over folds), mode (hard | soft), TPE sampler settings, the per-class search space and per-class
overrides. The study lives in any Optuna storage (default ``sqlite:///RUN_DIR/sweep.db``; also
``journal:///path/file.log`` or ``postgresql+psycopg://...``); ``--workers N`` processes share it.

Trials are proposed by TPE (optuna's Parzen estimators, ``BatchTPE``) a batch at a time and written to the
study as finished trials, one storage transaction per batch (``TrialWriter``). The objective is (``mean``)
or is bounded by (``robust``) the mean of per-class terms, so each class gets its own 4-parameter TPE on
its own term (``TrialSearch``). Optuna's per-trial ``study.optimize`` spent ~35 ms a trial in the sampler
(a pass over every trial) plus ~20 storage writes a trial; 1000 trials now take seconds, not minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from steel import N_CLASSES
from steel.errors import SteelError
from steel.io import atomic_path
from steel.metrics import dice_per_pair
from steel.oof import OOFStore, OOFWriter, strided_shape
from steel.postprocess import PARAM_KEYS, THRESHOLDS_FILE, ClassParams, Params, postprocess

STATS_VERSION = 1
# Probability of each quantised level exactly as OOFStore.probs computes it (float32 q / 255).
LEVELS = np.arange(256, dtype=np.float32) / np.float32(255.0)

DEFAULT_CONFIG: dict[str, Any] = {
    "trials": 1000,
    "objective": "mean",
    "robust_k": 1.0,
    "mode": "hard",
    "sampler": {"n_startup_trials": 50, "multivariate": True, "n_ei_candidates": 24, "batch": 16},
    "space": {
        "label": {"low": 0.3, "high": 0.9, "step": 0.05},
        "pixel": {"low": 0.3, "high": 0.7, "step": 0.05},
        "min_area": {"low": 0, "high": 3000, "step": 100},
        "min_component": {"low": 0, "high": 300, "step": 50},
    },
    "classes": {},
}
CONFIG_KEYS = set(DEFAULT_CONFIG)
SAMPLER_KEYS = {"n_startup_trials", "multivariate", "n_ei_candidates", "batch"}
OBJECTIVES = ("mean", "robust")


# ----------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Dim:
    """One search dimension: values low, low + step, ..., high (rounded to 10 decimals)."""

    low: float
    high: float
    step: float
    integer: bool

    @property
    def n(self) -> int:
        return int(round((self.high - self.low) / self.step)) + 1

    def value(self, i: int) -> float | int:
        v = round(self.low + i * self.step, 10)
        return int(round(v)) if self.integer else v

    def values(self) -> list[float | int]:
        return [self.value(i) for i in range(self.n)]

    def index(self, v: float) -> int:
        """Grid index of a value Optuna returned (``low + round((v - low) / step) * step``)."""
        return min(max(int(round((v - self.low) / self.step)), 0), self.n - 1)


def _dim(spec: Any, key: str, where: str) -> Dim:
    if not isinstance(spec, dict) or set(spec) != {"low", "high", "step"}:
        raise SteelError(f"{where}: {key} must be a mapping with exactly low, high, step; got {spec!r}")
    lo, hi, st = spec["low"], spec["high"], spec["step"]
    if any(
        isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) for v in (lo, hi, st)
    ):
        raise SteelError(f"{where}: {key} low/high/step must be numbers; got {spec!r}")
    integer = key in ("min_area", "min_component")
    if integer and not all(float(v).is_integer() for v in (lo, hi, st)):
        raise SteelError(f"{where}: {key} low/high/step must be whole pixel counts; got {spec!r}")
    if st <= 0 or lo > hi:
        raise SteelError(f"{where}: {key} needs step > 0 and low <= high; got {spec!r}")
    if integer and lo < 0:
        raise SteelError(f"{where}: {key} low {lo} must be >= 0")
    if not integer and not (0.0 <= lo and hi <= 1.0):
        raise SteelError(f"{where}: {key} range [{lo}, {hi}] must lie in [0, 1]")
    k = (hi - lo) / st
    if abs(k - round(k)) > 1e-6:
        raise SteelError(f"{where}: {key} range {hi} - {lo} is not a multiple of step {st}")
    if integer:
        return Dim(int(lo), int(hi), int(st), True)
    return Dim(float(lo), float(hi), float(st), False)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = (
            _merge(out[k], v)
            if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "classes"
            else v
        )
    return out


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """Sweep config: ``DEFAULT_CONFIG`` updated by the YAML file (if any), validated.

    Adds ``dims``: per class (0-based) {key: Dim}, and ``source``. SteelError names the file and key.
    """
    import yaml

    where = "built-in default config" if path is None else str(path)
    user: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SteelError(f"{p}: sweep config not found")
        try:
            user = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise SteelError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(user, dict):
            raise SteelError(f"{p}: expected a mapping at the top level")
    unknown = set(user) - CONFIG_KEYS
    if unknown:
        raise SteelError(
            f"{where}: unknown key {sorted(unknown)[0]!r} (expected {', '.join(sorted(CONFIG_KEYS))})"
        )
    for k in ("sampler", "space", "classes"):
        if k in user and not isinstance(user[k], dict):
            raise SteelError(f"{where}: {k} must be a mapping")
    cfg = _merge(DEFAULT_CONFIG, user)
    if set(cfg["sampler"]) - SAMPLER_KEYS:
        raise SteelError(f"{where}: unknown sampler key {sorted(set(cfg['sampler']) - SAMPLER_KEYS)[0]!r}")
    for key, least in (("n_startup_trials", 0), ("n_ei_candidates", 1), ("batch", 1)):
        v = cfg["sampler"][key]
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise SteelError(f"{where}: sampler {key} {v!r} must be an integer >= {least}")
    if not isinstance(cfg["sampler"]["multivariate"], bool):
        raise SteelError(
            f"{where}: sampler multivariate {cfg['sampler']['multivariate']!r} must be true or false"
        )
    if set(cfg["space"]) != set(PARAM_KEYS):
        bad = sorted(set(cfg["space"]) ^ set(PARAM_KEYS))[0]
        raise SteelError(f"{where}: space key {bad!r} unknown or missing (expected {', '.join(PARAM_KEYS)})")
    trials = cfg["trials"]
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise SteelError(f"{where}: trials {trials!r} must be an integer >= 0")
    if cfg["objective"] not in OBJECTIVES:
        raise SteelError(f"{where}: objective {cfg['objective']!r} is not one of {', '.join(OBJECTIVES)}")
    if cfg["mode"] not in ("hard", "soft"):
        raise SteelError(f"{where}: mode {cfg['mode']!r} is not one of hard, soft")
    rk = cfg["robust_k"]
    if isinstance(rk, bool) or not isinstance(rk, int | float) or rk < 0:
        raise SteelError(f"{where}: robust_k {rk!r} must be a number >= 0")
    classes = {str(k): v for k, v in cfg["classes"].items()}
    want = {str(c) for c in range(1, N_CLASSES + 1)}
    if set(classes) - want:
        raise SteelError(
            f"{where}: classes key {sorted(set(classes) - want)[0]!r} is not one of 1-{N_CLASSES}"
        )
    dims = []
    for c in range(1, N_CLASSES + 1):
        over = classes.get(str(c), {}) or {}
        if not isinstance(over, dict) or set(over) - set(PARAM_KEYS):
            raise SteelError(f"{where}: classes.{c} may only override {', '.join(PARAM_KEYS)}; got {over!r}")
        space = _merge(cfg["space"], over)  # a partial {low, high, step} inherits the rest
        dims.append({k: _dim(space[k], k, f"{where}: class {c}") for k in PARAM_KEYS})
    cfg["classes"] = classes
    cfg["dims"] = dims
    cfg["source"] = where
    return cfg


def space_signature(cfg: dict[str, Any]) -> str:
    """What makes trials comparable: the per-class space, mode and objective."""
    dims = [{k: [d.low, d.high, d.step] for k, d in cd.items()} for cd in cfg["dims"]]
    sig = {
        "dims": dims,
        "mode": cfg["mode"],
        "objective": cfg["objective"],
        "robust_k": float(cfg["robust_k"]),
    }
    return json.dumps(sig, sort_keys=True)


def sweep_grids(cfg: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Union over classes of the pixel-threshold grid (P,) and of the component-size grid (K,), 0 first."""
    pix = sorted({v for cd in cfg["dims"] for v in cd["pixel"].values()})
    comp = sorted({0, *(v for cd in cfg["dims"] for v in cd["min_component"].values())})
    return np.array(pix, dtype=np.float64), np.array(comp, dtype=np.float64)


# ------------------------------------------------------------------------------------ statistics
def level_index(pixel: np.ndarray, cls: np.ndarray | None = None) -> np.ndarray:
    """Smallest quantised level q with ``LEVELS[q] (* cls) >= pixel`` (256: none), as post-processing decides.

    pixel (P,) -> (P,) for hard mode; with cls (N, 4) float32 (soft mode) -> (N, 4, P). Comparisons in float32.
    """
    pix = np.asarray(pixel, dtype=np.float64).astype(np.float32)
    if cls is None:
        return np.searchsorted(LEVELS, pix, side="left").astype(np.int64)
    cls = np.asarray(cls, dtype=np.float32)
    out = np.empty((*cls.shape, len(pix)), dtype=np.int64)
    for j, t in enumerate(pix):  # x(q) = LEVELS[q] * cls is non-decreasing in q
        out[..., j] = (LEVELS * cls[..., None] < t).sum(-1)
    return out


def _chunk_stats(
    oof_dir: str, start: int, stop: int, qmin: np.ndarray, comp: np.ndarray, stride: int
) -> dict:
    """Statistics of rows [start, stop): qmin (B, 4, P) level index per pixel-grid threshold."""
    cv2.setNumThreads(1)
    store = OOFStore(oof_dir)
    q = np.ascontiguousarray(store.masks[start:stop])
    t = np.ascontiguousarray(store.truth[start:stop]) != 0
    b, c, h, w = q.shape
    n, p, k = b * c, qmin.shape[-1], len(comp)
    qf, tf = q.reshape(n, h, w), t.reshape(n, h, w)
    tf8 = tf.view(np.uint8)
    true_area = tf.reshape(n, -1).sum(1)
    hist_all = np.zeros((n, 256), np.int64)
    hist_true = np.zeros((n, 256), np.int64)
    for i in range(n):
        hist_all[i] = cv2.calcHist([qf[i]], [0], None, [256], [0, 256]).ravel()
        if true_area[i]:
            hist_true[i] = cv2.calcHist([qf[i]], [0], tf8[i], [256], [0, 256]).ravel()
    zero = np.zeros((n, 1), np.int64)
    ge_all = np.concatenate([np.cumsum(hist_all[:, ::-1], 1)[:, ::-1], zero], 1)
    ge_true = np.concatenate([np.cumsum(hist_true[:, ::-1], 1)[:, ::-1], zero], 1)
    qm = qmin.reshape(n, p)
    area_at = np.take_along_axis(ge_all, qm, 1)  # (n, P)
    inter_at = np.take_along_axis(ge_true, qm, 1)
    kept_area = np.repeat(area_at[:, :, None], k, 2)
    kept_inter = np.repeat(inter_at[:, :, None], k, 2)
    s2 = stride * stride
    if k > 1:
        kept_area[:, :, 1:] = 0
        kept_inter[:, :, 1:] = 0
        need = area_at * s2 >= comp[1]  # else every component is smaller than every size > 0
        dup = np.zeros_like(need)
        dup[:, 1:] = area_at[:, 1:] == area_at[:, :-1]  # nested masks of equal area are equal
        todo = np.argwhere(need & ~dup)  # (plane, level) pairs to label, plane-major, levels ascending
        if len(todo):
            # Each plane is labelled in the columns spanned by its largest mask to label, transposed so the
            # crops stack as rows (8-connectivity is symmetric), a zero row after each keeps them apart.
            planes, first = np.unique(todo[:, 0], return_index=True)
            lowest = qm[planes, todo[first, 1]]
            cols = (qf[planes] >= lowest[:, None, None]).any(1)  # (planes, w)
            c0, c1 = np.zeros(n, np.int64), np.zeros(n, np.int64)
            c0[planes] = cols.argmax(1)
            c1[planes] = w - cols[:, ::-1].argmax(1)
            width = c1[todo[:, 0]] - c0[todo[:, 0]]
            ends = np.cumsum((width + 1) * h)
            budget, s = 4_000_000, 0
            while s < len(todo):
                e = max(s + 1, int(np.searchsorted(ends, (ends[s - 1] if s else 0) + budget, side="right")))
                ii, jj, ww = todo[s:e, 0], todo[s:e, 1], width[s:e]
                m = e - s
                starts = np.concatenate([[0], np.cumsum(ww + 1)[:-1]])
                buf = np.zeros((int((ww + 1).sum()), h), np.uint8)
                tbuf = np.zeros(buf.shape, bool)
                for i, a, wd, lv in zip(ii.tolist(), starts.tolist(), ww.tolist(), qm[ii, jj].tolist()):
                    buf[a : a + wd] = (qf[i, :, c0[i] : c1[i]] >= lv).T
                    if true_area[i]:
                        tbuf[a : a + wd] = tf[i, :, c0[i] : c1[i]].T
                nlab, labels = cv2.connectedComponents(buf, connectivity=8, ltype=cv2.CV_32S)
                fg = np.flatnonzero(buf.reshape(-1).view(bool))  # 0/1 bytes; the bool path is much faster
                labs = labels.reshape(-1)[fg]
                lab_plane = np.zeros(nlab, np.int64)
                lab_plane[labs] = np.repeat(np.arange(m), ww + 1)[fg // h]
                sizes = np.bincount(labs, minlength=nlab)
                tsizes = np.bincount(labs[tbuf.reshape(-1)[fg]], minlength=nlab)
                for kk in range(1, k):
                    small = sizes * s2 < comp[kk]
                    small[0] = False
                    rem_a = np.bincount(lab_plane[small], weights=sizes[small], minlength=m).astype(np.int64)
                    rem_i = np.bincount(lab_plane[small], weights=tsizes[small], minlength=m).astype(np.int64)
                    kept_area[ii, jj, kk] = area_at[ii, jj] - rem_a
                    kept_inter[ii, jj, kk] = inter_at[ii, jj] - rem_i
                s = e
        for j in range(1, p):
            d = dup[:, j] & need[:, j]
            kept_area[d, j, 1:] = kept_area[d, j - 1, 1:]
            kept_inter[d, j, 1:] = kept_inter[d, j - 1, 1:]
    return {
        "ge_all": ge_all.reshape(b, c, 257).astype(np.int32),
        "ge_true": ge_true.reshape(b, c, 257).astype(np.int32),
        "kept_area": kept_area.reshape(b, c, p, k).astype(np.int32),
        "kept_inter": kept_inter.reshape(b, c, p, k).astype(np.int32),
    }


def _chunk_stats_star(args: tuple) -> tuple[int, dict]:
    return args[1], _chunk_stats(*args)


def compute_stats(
    store: OOFStore,
    pixel: np.ndarray,
    comp: np.ndarray,
    mode: str = "hard",
    workers: int = 1,
    chunk: int = 32,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Sufficient statistics of a store for a pixel-threshold grid (P,) and component-size grid (K, comp[0] = 0).

    Streams over the memmap in chunks of ``chunk`` images (``workers`` processes); see the module docstring.
    """
    pixel, comp = np.asarray(pixel, np.float64), np.asarray(comp, np.float64)
    if comp[0] != 0 or np.any(np.diff(comp) <= 0) or np.any(np.diff(pixel) <= 0):
        raise ValueError("compute_stats: grids must be increasing and the component grid must start at 0")
    n = len(store)
    if mode == "soft":
        qmin = level_index(pixel, np.asarray(store.cls))
    else:
        qmin = np.broadcast_to(level_index(pixel), (n, N_CLASSES, len(pixel)))
    p, k = len(pixel), len(comp)
    out = {
        "ge_all": np.zeros((n, N_CLASSES, 257), np.int32),
        "ge_true": np.zeros((n, N_CLASSES, 257), np.int32),
        "kept_area": np.zeros((n, N_CLASSES, p, k), np.int32),
        "kept_inter": np.zeros((n, N_CLASSES, p, k), np.int32),
    }
    jobs = [
        (str(store.dir), a, min(n, a + chunk), np.ascontiguousarray(qmin[a : a + chunk]), comp, store.stride)
        for a in range(0, n, chunk)
    ]
    bar = tqdm(total=n, desc="sweep statistics", unit="img", disable=not progress, dynamic_ncols=True)
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for start, res in pool.imap_unordered(_chunk_stats_star, jobs):
                for key, v in res.items():
                    out[key][start : start + len(v)] = v
                bar.update(len(res["ge_all"]))
    else:
        for job in jobs:
            res = _chunk_stats(*job)
            for key, v in res.items():
                out[key][job[1] : job[2]] = v
            bar.update(job[2] - job[1])
    bar.close()
    out.update(pixel=pixel, comp=comp, stride=np.array(store.stride), mode=np.array(mode))
    return out


def _stats_key(store: OOFStore, pixel: np.ndarray, comp: np.ndarray, mode: str) -> str:
    files = {}
    for name in ("masks.npy", "truth.npy", "cls.npy", "index.csv"):
        st = (store.dir / name).stat()
        files[name] = [st.st_size, st.st_mtime_ns]
    ident = {
        "v": STATS_VERSION,
        "pixel": pixel.tolist(),
        "comp": comp.tolist(),
        "mode": mode,
        "files": files,
        "n": len(store),
    }
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def load_or_compute_stats(
    store: OOFStore,
    pixel: np.ndarray,
    comp: np.ndarray,
    mode: str = "hard",
    workers: int = 1,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], Path]:
    """Cached statistics (``oof/stats-<hash>.npz``, written atomically) -> (stats, cache path).

    A store that cannot be written to gets its cache in the temp dir.
    """
    key = _stats_key(store, pixel, comp, mode)
    path = store.dir / f"stats-{key}.npz"
    if not os.access(store.dir, os.W_OK):
        path = Path(tempfile.gettempdir()) / f"steel-stats-{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}, path
        except (OSError, ValueError):
            pass  # damaged: recompute
    stats = compute_stats(store, pixel, comp, mode, workers=workers, progress=progress)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **stats)
    return stats, path


# ---------------------------------------------------------------------------------------- fast dice
def _min_cells(min_area: float, s2: int) -> int:
    """Smallest integer area a at the store stride with ``a * s2 >= min_area``."""
    a = max(0, math.ceil(min_area / s2))
    while a > 0 and (a - 1) * s2 >= min_area:
        a -= 1
    while a * s2 < min_area:
        a += 1
    return a


class FastDice:
    """Dice per (image, class) of post-processing parameters from ``compute_stats`` statistics."""

    def __init__(self, stats: dict[str, np.ndarray], cls: np.ndarray, folds: np.ndarray) -> None:
        self.pixel = np.asarray(stats["pixel"], np.float64)
        self.comp = np.asarray(stats["comp"], np.float64)
        self.stride = int(stats["stride"])
        self.s2 = self.stride * self.stride
        self.mode = str(stats["mode"])
        self.ge_all, self.ge_true = stats["ge_all"], stats["ge_true"]
        self.n = len(self.ge_all)
        self.cls = np.asarray(cls, np.float32)
        self.cls_t = np.ascontiguousarray(self.cls.T)  # (4, N)
        self.A = np.ascontiguousarray(stats["kept_area"].transpose(1, 2, 3, 0))  # (4, P, K, N)
        self.I = np.ascontiguousarray(stats["kept_inter"].transpose(1, 2, 3, 0))
        self.T = np.ascontiguousarray(self.ge_true[:, :, 0].T).astype(np.int64)  # true area (4, N)
        self.drop = (self.T == 0).astype(np.float64)  # dice of an empty prediction
        self._kept: dict[tuple[int, int, int], np.ndarray] = {}
        _, self.fold_idx = np.unique(np.asarray(folds), return_inverse=True)
        self.n_folds = int(self.fold_idx.max()) + 1 if self.n else 0
        self.fold_count = np.bincount(self.fold_idx, minlength=self.n_folds).astype(np.float64)
        if len(self.cls) != self.n or len(self.fold_idx) != self.n:
            raise ValueError("FastDice: statistics, cls and folds disagree on the number of images")

    def _dice_kept(self, c: int, j: int, k: int) -> np.ndarray:
        key = (c, j, k)
        d = self._kept.get(key)
        if d is None:
            den = self.A[c, j, k].astype(np.float64) + self.T[c]
            d = np.where(den == 0, 1.0, 2.0 * self.I[c, j, k] / np.maximum(den, 1))
            self._kept[key] = d
        return d

    def grid_index(self, pixel: float, min_component: float) -> tuple[int | None, int | None]:
        """Indices of a pixel threshold / component size in the precomputed grids (None if absent)."""
        j = np.flatnonzero(np.abs(self.pixel - pixel) < 1e-9)
        if min_component <= self.s2:  # every component has size * s2 >= s2: nothing removed
            k = [0]
        else:
            k = np.flatnonzero(np.abs(self.comp - min_component) < 1e-9)
        return (int(j[0]) if len(j) else None), (int(k[0]) if len(k) else None)

    def class_dice_at(self, c: int, label: float, j: int, min_area: float, k: int) -> np.ndarray:
        """Dice (N,) of class c (0-based) with pixel grid index j and component grid index k."""
        keep = self.cls_t[c] >= np.float32(label)
        amin = _min_cells(min_area, self.s2)
        if amin > 0:
            keep &= self.A[c, j, k] >= amin
        return np.where(keep, self._dice_kept(c, j, k), self.drop[c])

    def class_dice(self, c: int, p: ClassParams, mode: str) -> np.ndarray:
        """Dice (N,) of class c (0-based) for any pixel threshold when no components are removed, else on the grid."""
        j, k = self.grid_index(p.pixel, p.min_component)
        if j is not None and k is not None and mode == self.mode:
            return self.class_dice_at(c, p.label, j, p.min_area, k)
        if k != 0:
            raise ValueError(
                f"class {c + 1}: pixel {p.pixel} / min_component {p.min_component} / mode {mode} not in the "
                f"precomputed grid (pixel {self.pixel.tolist()}, component {self.comp.tolist()}, mode {self.mode})"
            )
        if mode == "soft":
            q = level_index(np.array([p.pixel]), self.cls[:, c])[:, 0]
        else:
            q = np.full(self.n, level_index(np.array([p.pixel]))[0])
        rows = np.arange(self.n)
        area, inter = self.ge_all[rows, c, q].astype(np.int64), self.ge_true[rows, c, q].astype(np.float64)
        keep = (self.cls_t[c] >= np.float32(p.label)) & (area * self.s2 >= p.min_area)
        den = area + self.T[c]
        kept = np.where(den == 0, 1.0, 2.0 * inter / np.maximum(den, 1))
        return np.where(keep, kept, self.drop[c])

    def per_pair(self, params: Params) -> np.ndarray:
        """Dice (N, 4) of every (image, class)."""
        return np.stack([self.class_dice(c, p, params.mode) for c, p in enumerate(params.classes)], 1)

    def score(self, per_class: list[np.ndarray], objective: str = "mean", k: float = 1.0) -> float:
        """Objective from per-class dice vectors: mean over (image, class), or fold mean - k * fold std."""
        if objective == "mean":
            return float(sum(d.sum() for d in per_class) / (self.n * len(per_class)))
        per_image = sum(per_class) / len(per_class)
        fold_mean = np.bincount(self.fold_idx, weights=per_image, minlength=self.n_folds) / self.fold_count
        return float(fold_mean.mean() - k * fold_mean.std())

    def summary(self, params: Params) -> dict[str, Any]:
        """{'mean', 'per_class' [4], 'folds' [F]} dice of a parameter set."""
        d = self.per_pair(params)
        fold = np.bincount(self.fold_idx, weights=d.mean(1), minlength=self.n_folds) / self.fold_count
        return {"mean": float(d.mean()), "per_class": d.mean(0).tolist(), "folds": fold.tolist()}


def brute_force_dice(
    store: OOFStore, params: Params, rows: np.ndarray | list[int] | None = None
) -> np.ndarray:
    """Reference: post-process every mask of ``rows`` and score it -> dice (n, 4)."""
    rows = np.arange(len(store)) if rows is None else np.asarray(rows)
    out = np.empty((len(rows), N_CLASSES))
    for i, r in enumerate(rows):
        pred = postprocess(store.probs(int(r)), store.cls[r], params, store.stride)
        out[i] = dice_per_pair(pred[None], store.truth[r][None])[0]
    return out


# ------------------------------------------------------------------------------------------- optuna
def _mask_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def default_storage(run_dir: str | os.PathLike) -> str:
    """``sqlite:///RUN_DIR/sweep.db`` (absolute path)."""
    return f"sqlite:///{Path(run_dir).resolve() / 'sweep.db'}"


def _sqlite_setup(engine: Any) -> None:
    """WAL journal, relaxed fsync and BEGIN IMMEDIATE so concurrent workers wait instead of failing."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=600000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()


def open_storage(url: str, existing: bool = False) -> Any:
    """An Optuna storage from a URL: ``journal:///FILE`` (journal file) or any SQLAlchemy URL (RDB).

    ``existing``: the RDB tables were made already (workers skip the schema checks).
    """
    import optuna

    if url.startswith("journal:"):
        path = url.removeprefix("journal://")
        if path == url or not path:
            raise SteelError(
                f"--storage {url}: journal storage URL must look like journal:///path/to/file.log"
            )
        from optuna.storages.journal import JournalFileBackend

        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        except OSError as e:
            raise SteelError(f"--storage {url}: cannot open journal file ({e})") from None
    if "://" not in url:
        raise SteelError(
            f"--storage {url!r} is not a storage URL (sqlite:///FILE, postgresql+psycopg://USER@HOST/DB, journal:///FILE)"
        )
    sqlite = url.startswith("sqlite")
    if sqlite and url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        with contextlib.suppress(OSError):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"timeout": 600}} if sqlite else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, skip_compatibility_check=existing, skip_table_creation=existing
            )
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SteelError(
            f"--storage {_mask_url(url)}: cannot open ({type(e).__name__}: {msg[:300]})"
        ) from None
    if sqlite:
        _sqlite_setup(storage.engine)
    return storage


def _distribution(d: Dim) -> Any:
    """The Optuna distribution ``trial.suggest_int/suggest_float(name, low, high, step=step)`` makes."""
    import optuna

    if d.integer:
        return optuna.distributions.IntDistribution(int(d.low), int(d.high), step=int(d.step))
    return optuna.distributions.FloatDistribution(d.low, d.high, step=d.step)


def trial_distributions(cfg: dict[str, Any]) -> dict[str, Any]:
    """Optuna distributions of the 16 trial parameters, in order ``label_1, pixel_1, ..., min_component_4``."""
    return {f"{k}_{c}": _distribution(d[k]) for c, d in enumerate(cfg["dims"], 1) for k in PARAM_KEYS}


def params_from_trial(values: dict[str, Any], cfg: dict[str, Any]) -> Params:
    """Params of a trial's Optuna values (``label_1``, ..., ``min_component_4``), snapped to the grid values."""
    out = []
    for c, dims in enumerate(cfg["dims"], 1):
        out.append(ClassParams(**{k: dims[k].value(dims[k].index(values[f"{k}_{c}"])) for k in PARAM_KEYS}))
    return Params(tuple(out), cfg["mode"])


class Objective:
    """The sweep objective over the per-class space: grid indices of a trial's values, scored with FastDice.

    ``evaluate(values)`` -> (objective, per-class mean dice (4,)); calling it with an Optuna trial suggests
    the 16 parameters (so ``study.optimize(Objective(fast, cfg))`` also works).
    """

    def __init__(self, fast: FastDice, cfg: dict[str, Any]) -> None:
        if fast.mode != cfg["mode"]:
            raise ValueError(
                f"Objective: statistics are for mode {fast.mode}, the config asks for {cfg['mode']}"
            )
        self.fast, self.cfg = fast, cfg
        self.kind, self.k = cfg["objective"], float(cfg["robust_k"])
        self.dists = trial_distributions(cfg)
        # per class: grid index of every pixel value / component size of the class's own dimension
        self.pix_idx, self.comp_idx = [], []
        for dims in cfg["dims"]:
            pi = [fast.grid_index(v, 0)[0] for v in dims["pixel"].values()]
            ci = [fast.grid_index(fast.pixel[0], v)[1] for v in dims["min_component"].values()]
            if None in pi or None in ci:
                raise ValueError("Objective: statistics were computed for another grid")
            self.pix_idx.append(pi)
            self.comp_idx.append(ci)

    def evaluate(self, values: dict[str, Any]) -> tuple[float, np.ndarray]:
        """(objective, each class's own objective term (4,)) of a trial's 16 parameter values.

        A class's term is the objective of that class alone: its mean dice (``mean``; the objective is the
        mean of the terms) or its fold mean - k * fold std (``robust``; the mean of the terms is a lower bound
        of the objective, as the std of a sum is at most the sum of the stds).
        """
        per_class = []
        for c, dims in enumerate(self.cfg["dims"]):
            v = {k: dims[k].index(values[f"{k}_{c + 1}"]) for k in PARAM_KEYS}
            per_class.append(
                self.fast.class_dice_at(
                    c,
                    dims["label"].value(v["label"]),
                    self.pix_idx[c][v["pixel"]],
                    dims["min_area"].value(v["min_area"]),
                    self.comp_idx[c][v["min_component"]],
                )
            )
        terms = np.array([self.fast.score([d], self.kind, self.k) for d in per_class])
        return self.fast.score(per_class, self.kind, self.k), terms

    def __call__(self, trial: Any) -> float:
        from optuna.distributions import IntDistribution

        values = {}
        for name, d in self.dists.items():
            suggest = trial.suggest_int if isinstance(d, IntDistribution) else trial.suggest_float
            values[name] = suggest(name, d.low, d.high, step=d.step)
        return self.evaluate(values)[0]


class BatchTPE:
    """Optuna's TPE over one group of grid parameters, proposing a batch of points per fit.

    The model is ``optuna.samplers.TPESampler``'s (its ``_ParzenEstimator`` with the sampler's default prior,
    bandwidths and weights): the best gamma(n) = min(ceil(0.1 n), 25) observations make l(x), the others
    g(x), and a proposal is the draw of largest l(x)/g(x) among ``n_ei`` draws from l(x), skipping grid
    points observed or proposed already while a draw is new. Fewer than ``n_startup`` observations: uniform
    on the grid. Unlike ``TPESampler``, the estimators are fitted once per ``propose(k)`` from observation
    arrays, not once per trial from every FrozenTrial of the study: that per-trial pass is what made 1000
    trials cost ~35 s.
    """

    def __init__(self, names: list[str], dims: list[Dim], n_startup: int, n_ei: int, seed: int) -> None:
        import optuna
        from optuna.samplers._tpe.parzen_estimator import _ParzenEstimator

        self.names, self.dims = list(names), list(dims)
        self.space = {n: _distribution(d) for n, d in zip(self.names, self.dims)}
        self.n_startup, self.n_ei = n_startup, n_ei
        self.rng = np.random.RandomState(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tpe = optuna.samplers.TPESampler(multivariate=len(self.names) > 1)
            self._pe_params = tpe._parzen_estimator_parameters
        self._pe = _ParzenEstimator
        self.x = np.zeros((0, len(self.names)))
        self.y = np.zeros(0)
        self._radix = np.cumprod([1] + [d.n for d in self.dims[:-1]])
        self._tried: set[int] = set()  # grid points observed, as codes

    def _codes(self, x: np.ndarray) -> np.ndarray:
        """Grid point (k, d) -> one integer code (k,)."""
        idx = [np.clip(np.rint((x[:, i] - d.low) / d.step), 0, d.n - 1) for i, d in enumerate(self.dims)]
        return (np.stack(idx, 1).astype(np.int64) * self._radix).sum(1)

    def observe(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add points x (k, d) with values y (k,) (larger is better)."""
        x = np.asarray(x, np.float64).reshape(-1, len(self.names))
        self.x = np.concatenate([self.x, x])
        self.y = np.concatenate([self.y, np.asarray(y, np.float64).ravel()])
        self._tried.update(self._codes(x).tolist())

    def propose(self, k: int) -> np.ndarray:
        """k points (k, d) to evaluate next."""
        n = len(self.y)
        if n < max(self.n_startup, 1):
            return np.stack([d.low + d.step * self.rng.randint(d.n, size=k) for d in self.dims], 1)
        order = np.argsort(-self.y, kind="stable")
        n_below = min(math.ceil(0.1 * n), 25)
        below, above = np.sort(order[:n_below]), np.sort(order[n_below:])  # in observation order, as optuna
        l_x, g_x = (
            self._pe({m: self.x[rows, i] for i, m in enumerate(self.names)}, self.space, self._pe_params)
            for rows in (below, above)
        )
        cand = l_x.sample(self.rng, k * self.n_ei)
        acq = (l_x.log_pdf(cand) - g_x.log_pdf(cand)).reshape(k, self.n_ei)
        pts = np.stack([cand[m] for m in self.names], 1)
        codes = self._codes(pts).reshape(k, self.n_ei)
        taken = set(self._tried)
        pick = []
        for i in range(k):  # the best draw of each group that is new (re-evaluating a point teaches nothing)
            new = np.array([c not in taken for c in codes[i].tolist()])
            j = int(np.where(new, acq[i], -np.inf).argmax()) if new.any() else int(acq[i].argmax())
            taken.add(int(codes[i, j]))
            pick.append(i * self.n_ei + j)
        return pts[pick]


class TrialSearch:
    """Proposes batches of 16-parameter trials and learns from finished ones (its own and other workers').

    Each class's parameters are searched by their own TPE on that class's own objective term (see
    ``Objective.evaluate``; ``multivariate``: one 4-d TPE per class, else one per parameter), and with
    ``multivariate`` a batch also holds the best parameters seen of every class together when no trial has
    them yet. The ``mean`` objective is the mean of the class terms, so that trial is at least as good as any
    so far; for ``robust`` (not separable) it is just one more candidate.
    """

    def __init__(self, objective: Objective, cfg: dict[str, Any], seed: int) -> None:
        s = {**DEFAULT_CONFIG["sampler"], **cfg["sampler"]}
        self.objective = objective
        dims = {f"{k}_{c}": d[k] for c, d in enumerate(cfg["dims"], 1) for k in PARAM_KEYS}
        self.dims, self.names = dims, list(dims)
        per_class = [[f"{k}_{c}" for k in PARAM_KEYS] for c in range(1, N_CLASSES + 1)]
        groups = per_class if s["multivariate"] else [[n] for n in self.names]
        self.term = [int(g[0].rsplit("_", 1)[1]) - 1 for g in groups]  # a group learns its class's term
        self.composite = bool(s["multivariate"])
        self.groups = [
            BatchTPE(g, [dims[n] for n in g], s["n_startup_trials"], s["n_ei_candidates"], seed + 7 * i)
            for i, g in enumerate(groups)
        ]
        self.batch = int(s["batch"])
        self.seen: set[int] = set()  # trial numbers already observed
        self.finished: dict[int, float] = {}  # their objective values, as stored
        self.best = -math.inf
        self._cache: dict[tuple, tuple[float, np.ndarray]] = {}

    def _key(self, values: dict[str, Any]) -> tuple:
        return tuple(self.dims[n].index(values[n]) for n in self.names)

    def evaluate(self, values: dict[str, Any]) -> tuple[float, np.ndarray]:
        """``Objective.evaluate`` of a trial's values, cached by grid point."""
        key = self._key(values)
        out = self._cache.get(key)
        if out is None:
            out = self._cache[key] = self.objective.evaluate(values)
        return out

    def propose(self, k: int) -> list[dict[str, float | int]]:
        """k trials' values (snapped to the grids)."""
        cols: dict[str, np.ndarray] = {}
        for g in self.groups:
            cols.update(zip(g.names, g.propose(k).T))
        out = [{n: d.value(d.index(cols[n][i])) for n, d in self.dims.items()} for i in range(k)]
        if self.composite and self.finished:
            best = dict(kv for g in self.groups for kv in zip(g.names, g.x[g.y.argmax()]))
            best = {n: d.value(d.index(best[n])) for n, d in self.dims.items()}
            if self._key(best) not in self._cache:
                out[0] = best
        return out

    def observe(self, numbers: list[int], values: list[dict[str, Any]], stored: list[float]) -> None:
        """Learn from finished trials ``numbers`` with parameter ``values`` and ``stored`` objective values."""
        new = [(n, v, y) for n, v, y in zip(numbers, values, stored) if n not in self.seen]
        if not new:
            return
        self.seen.update(n for n, _, _ in new)
        self.finished.update((n, y) for n, _, y in new)
        self.best = max(self.best, *(y for _, _, y in new))
        scored = [self.evaluate(v) for _, v, _ in new]  # the groups learn from the current statistics
        for g, term in zip(self.groups, self.term):
            x = np.array([[v[n] for n in g.names] for _, v, _ in new], np.float64)
            y = np.array([s[1][term] for s in scored])
            g.observe(x, y)

    def sync(self, study: Any) -> None:
        """Observe the study's finished trials not seen yet (from earlier runs or other workers)."""
        from optuna.trial import TrialState

        trials = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.number not in self.seen
        ]
        self.seen.update(t.number for t in trials if not set(self.names) <= t.params.keys())
        ok = [t for t in trials if set(self.names) <= t.params.keys()]
        self.observe([t.number for t in ok], [t.params for t in ok], [t.value for t in ok])


def _rdb_add_trials(storage: Any, study_id: int, trials: list[Any]) -> list[int]:
    """Insert finished trials into an ``RDBStorage`` in one transaction -> their trial numbers.

    ``study.add_trials`` runs ~50 ORM statements per 16-parameter trial (a trial lookup and a distribution
    query per parameter), each trial its own transaction: ~40 ms a trial on SQLite, more than the search.
    This inserts the same rows into optuna's tables (its own table models and value conversions) with three
    executemany statements, numbering the trials under the lock on the study row that optuna's
    ``create_new_trial`` takes (SQLite: the BEGIN IMMEDIATE of ``_sqlite_setup``).
    """
    import sqlalchemy as sa
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models

    trial_t, param_t = models.TrialModel.__table__, models.TrialParamModel.__table__
    value_t = models.TrialValueModel.__table__
    mapper = sa.inspect(models.TrialModel)
    dt_keys = {
        c: mapper.get_property_by_column(trial_t.c[c]).key for c in ("datetime_start", "datetime_complete")
    }
    with storage.engine.begin() as conn:
        conn.execute(
            sa.select(models.StudyModel.study_id)
            .where(models.StudyModel.study_id == study_id)
            .with_for_update()
        )
        n = conn.execute(
            sa.select(sa.func.count(trial_t.c.trial_id)).where(trial_t.c.study_id == study_id)
        ).scalar_one()
        rows = []
        for i, t in enumerate(trials):  # a transient model converts the datetimes as optuna stores them
            m = models.TrialModel(datetime_start=t.datetime_start, datetime_complete=t.datetime_complete)
            rows.append(
                {"study_id": study_id, "number": n + i, "state": t.state}
                | {c: getattr(m, k) for c, k in dt_keys.items()}
            )
        conn.execute(sa.insert(trial_t), rows)
        ids = dict(
            conn.execute(
                sa.select(trial_t.c.number, trial_t.c.trial_id).where(
                    trial_t.c.study_id == study_id, trial_t.c.number >= n
                )
            ).all()
        )
        params, values, as_json = [], [], {}

        for i, t in enumerate(trials):
            for k, v in t.params.items():
                d = t.distributions[k]
                if id(d) not in as_json:
                    as_json[id(d)] = (d, distribution_to_json(d))
                params.append(
                    {
                        "trial_id": ids[n + i],
                        "param_name": k,
                        "param_value": d.to_internal_repr(v),
                        "distribution_json": as_json[id(d)][1],
                    }
                )
            value, value_type = models.TrialValueModel.value_to_stored_repr(t.value)
            values.append({"trial_id": ids[n + i], "objective": 0, "value": value, "value_type": value_type})
        conn.execute(sa.insert(param_t), params)
        conn.execute(sa.insert(value_t), values)
    return list(range(n, n + len(trials)))


class TrialWriter:
    """Writes finished trials into a study's storage -> their numbers: one transaction per call for an
    RDB storage (``_rdb_add_trials``), ``storage.create_new_trial`` per trial for the others (journal, memory).
    """

    def __init__(self, storage: Any, study_name: str) -> None:
        import optuna

        self.storage, self.study_id = storage, storage.get_study_id_from_name(study_name)
        self.bulk = isinstance(storage, optuna.storages.RDBStorage)

    def write(self, trials: list[Any]) -> list[int]:
        if self.bulk:
            try:
                return _rdb_add_trials(self.storage, self.study_id, trials)
            except Exception as e:  # rolled back: nothing written; optuna's own (slower) path still works
                self.bulk = False
                print(
                    f"steel sweep: warning: bulk trial insert failed ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); adding trials one by one",
                    file=sys.stderr,
                )
        ids = [self.storage.create_new_trial(self.study_id, template_trial=t) for t in trials]
        return [self.storage.get_trial_number_from_id(i) for i in ids]


def _run_trials(
    study: Any, storage: Any, search: TrialSearch, trials: int, tick: Any, sync: bool = False
) -> None:
    """Add ``trials`` finished trials to ``study``: propose a batch, evaluate it, write it in one transaction.

    With ``sync`` (other workers share the study) learn from their new trials before every batch.
    ``tick(n_new, best_value)`` after each batch.
    """
    import optuna

    writer = TrialWriter(storage, study.study_name)
    dists = search.objective.dists
    while trials > 0:
        if sync:
            search.sync(study)
        values = search.propose(min(search.batch, trials))
        scores = [search.evaluate(v)[0] for v in values]
        made = [
            optuna.trial.create_trial(params=v, distributions=dists, value=y) for v, y in zip(values, scores)
        ]
        search.observe(writer.write(made), values, scores)
        trials -= len(values)
        tick(len(values), search.best)


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _study_worker(spec: dict[str, Any], counter: Any, worker: int) -> None:
    """One ``--workers`` process: load cached stats, join the study through its storage, add its trials."""
    import optuna

    _quiet_optuna()
    try:
        store = OOFStore(spec["store"])
        with np.load(spec["stats"]) as z:
            stats = {k: z[k] for k in z.files}
        fast = FastDice(stats, np.asarray(store.cls), store.folds)
        cfg = spec["config"]
        storage = open_storage(spec["storage"], existing=True)
        study = optuna.load_study(study_name=spec["study"], storage=storage)

        def tick(n: int, best: float) -> None:
            with counter.get_lock():
                counter.value += n

        search = TrialSearch(Objective(fast, cfg), cfg, spec["seed"])
        _run_trials(study, storage, search, spec["trials"], tick, sync=True)
    except KeyboardInterrupt:
        sys.exit(130)


def run_study(
    fast: FastDice,
    cfg: dict[str, Any],
    storage_url: str,
    storage: Any,
    study_name: str,
    trials: int,
    workers: int = 1,
    seed: int = 0,
    stats_path: Path | None = None,
    store_dir: Path | None = None,
    progress: bool = True,
) -> tuple[Any, bool, dict[int, float]]:
    """Create/load the study in ``storage`` (opened from ``storage_url``, which workers reopen) and add
    ``trials`` finished trials with ``workers`` processes -> (study, interrupted, {number: value} of the
    study's finished trials; known without reading the study back when one process ran them).

    A new study starts with the default thresholds (snapped into the space), so best >= default.
    """
    import optuna

    _quiet_optuna()
    sig = space_signature(cfg)
    try:
        study = optuna.create_study(
            study_name=study_name, storage=storage, direction="maximize", load_if_exists=True
        )
    except Exception as e:
        raise SteelError(
            f"--storage {_mask_url(storage_url)}: cannot create study {study_name!r} ({e})"
        ) from None
    have = study.user_attrs.get("space")
    if have is None:
        study.set_user_attr("space", sig)
    elif have != sig:
        raise SteelError(
            f"study {study_name!r} in {_mask_url(storage_url)} was made with another search space/mode/objective; "
            "pass --study-name NEW (or the config it was made with)"
        )
    objective = Objective(fast, cfg)
    n_before = len(study.get_trials(deepcopy=False))
    bar = tqdm(
        total=trials,
        desc="sweep trials" + (f" ({workers} workers)" if workers > 1 else ""),
        unit="trial",
        disable=not progress,
        dynamic_ncols=True,
    )

    def tick(n: int, best: float) -> None:
        bar.update(n)
        bar.set_postfix(best=f"{best:.5f}", refresh=False)

    if n_before == 0 and trials > 0:
        dflt = {"label": 0.5, "pixel": 0.5, "min_area": 0, "min_component": 0}
        values = {
            f"{k}_{c}": d[k].value(d[k].index(v))
            for c, d in enumerate(cfg["dims"], 1)
            for k, v in dflt.items()
        }
        value = objective.evaluate(values)[0]
        TrialWriter(storage, study_name).write(
            [optuna.trial.create_trial(params=values, distributions=objective.dists, value=value)]
        )
        trials -= 1
        tick(1, value)
    interrupted = False
    finished: dict[int, float] | None = None
    if workers <= 1 or trials <= 1:
        search = TrialSearch(objective, cfg, seed + n_before)
        search.sync(study)
        try:
            _run_trials(study, storage, search, trials, tick)
        except KeyboardInterrupt:
            interrupted = True
        finished = search.finished
    else:
        import multiprocessing as mp

        if stats_path is None or store_dir is None:
            raise ValueError("run_study: workers > 1 needs stats_path and store_dir")
        ctx = mp.get_context("spawn")
        counter = ctx.Value("l", 0)
        shares = [trials // workers + (w < trials % workers) for w in range(workers)]
        procs = []
        for w, share in enumerate(shares):
            if share == 0:
                continue
            spec = {
                "store": str(store_dir),
                "stats": str(stats_path),
                "config": cfg,
                "storage": storage_url,
                "study": study_name,
                "trials": share,
                "seed": seed + n_before + 7919 * (w + 1),
            }
            procs.append(ctx.Process(target=_study_worker, args=(spec, counter, w), daemon=False))
        for p in procs:
            p.start()
        start = bar.n
        try:
            while any(p.is_alive() for p in procs):
                time.sleep(0.2)
                bar.n = start + counter.value
                bar.refresh()
        except KeyboardInterrupt:
            interrupted = True
        for p in procs:
            p.join()
        bar.n = start + counter.value
        failed = [p.exitcode for p in procs if p.exitcode not in (0, 130)]
        if failed and not interrupted:
            bar.close()
            raise RuntimeError(
                f"{len(failed)} sweep worker(s) failed (exit codes {failed}); see their output above"
            )
        study = optuna.load_study(study_name=study_name, storage=storage)
    bar.close()
    if finished is None:
        finished = {t.number: t.value for t in study.get_trials(deepcopy=False) if t.value is not None}
    return study, interrupted, finished


# ----------------------------------------------------------------------------------------- reports
def plot_curves(
    fast: FastDice, cfg: dict[str, Any], best: Params, default: dict[str, Any], path: Path
) -> None:
    """PNG: per class, dice vs pixel threshold and vs min-area, other parameters at the best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, N_CLASSES, figsize=(3.2 * N_CLASSES, 5.6), squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.88, bottom=0.09, hspace=0.45, wspace=0.3)
    for c, (p, dims) in enumerate(zip(best.classes, cfg["dims"])):
        best_dice = float(fast.class_dice(c, p, best.mode).mean())
        for row, key in enumerate(("pixel", "min_area")):
            xs = dims[key].values()
            ys = [
                float(fast.class_dice(c, ClassParams(**{**p.__dict__, key: x}), best.mode).mean()) for x in xs
            ]
            ax = axes[row, c]
            ax.plot(xs, ys, marker=".", lw=1.2)
            ax.axvline(getattr(p, key), color="C3", ls=":", lw=1, label=f"best {getattr(p, key)}")
            ax.axhline(default["per_class"][c], color="grey", ls="--", lw=1, label="default")
            ax.set_xlabel("pixel threshold" if key == "pixel" else "min area (full-res px)")
            ax.set_title(f"class {c + 1}: dice {best_dice:.4f}", fontsize=10)
            ax.legend(fontsize=7, loc="lower left")
            ax.grid(alpha=0.3)
        axes[0, c].set_ylabel("OOF dice" if c == 0 else "")
        axes[1, c].set_ylabel("OOF dice" if c == 0 else "")
    fig.suptitle(f"threshold sweep ({best.mode}): other parameters at the best", fontsize=11)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=72, format="png")
    plt.close(fig)


def log_wandb(
    run_dir: Path, summary: dict[str, Any], finished: dict[int, float], png: Path, name: str
) -> str | None:
    """Log the sweep summary, trial values and the PNG to W&B (offline unless WANDB_MODE says otherwise).

    Never fatal: returns the run id, or None after printing a warning.
    """
    if os.environ.get("WANDB_MODE", "offline") == "disabled":
        return None
    try:
        import wandb

        run = wandb.init(
            project="steel",
            group=run_dir.resolve().name,
            name=name,
            job_type="sweep",
            dir=str(run_dir),
            mode=os.environ.get("WANDB_MODE", "offline"),
            config={
                k: v
                for k, v in summary.items()
                if k in ("mode", "objective", "robust_k", "stride", "study_name")
            },
            reinit="finish_previous",
        )
        flat = {
            "oof_dice": summary["oof_dice"]["mean"],
            "default_dice": summary["default_dice"]["mean"],
            "trials": summary["trials"],
        }
        for c in range(N_CLASSES):
            flat[f"oof_dice_{c + 1}"] = summary["oof_dice"]["per_class"][c]
            for k, v in summary["classes"][str(c + 1)].items():
                flat[f"{k}_{c + 1}"] = v
        run.summary.update(flat)
        values = [[n, v] for n, v in sorted(finished.items())]
        run.log(
            {
                "trials": wandb.Table(data=values, columns=["trial", "objective"]),
                "dice_curves": wandb.Image(str(png)),
            }
        )
        run_id = run.id
        run.finish()
        return run_id
    except Exception as e:  # W&B trouble must never lose the sweep
        print(
            f"steel sweep: warning: W&B logging failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
            file=sys.stderr,
        )
        return None


# --------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run or ensemble directory with oof/ (thresholds.json is written here)")
    p.add_argument(
        "--config", default=None, help="sweep config YAML (default: built-in, same as sweeps/default.yaml)"
    )
    p.add_argument(
        "--trials", type=int, default=None, help="trials to add to the study (default: the config's)"
    )
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL (default sqlite:///RUN_DIR/sweep.db; journal:///FILE; postgresql+psycopg://...)",
    )
    p.add_argument(
        "--workers", type=int, default=1, help="processes sharing the study (and computing the statistics)"
    )
    p.add_argument("--study-name", default=None, help="study name (default thresholds-CONFIG_NAME)")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    trials = cfg["trials"] if args.trials is None else args.trials
    if trials < 0:
        raise SteelError(f"--trials {trials} must be >= 0")
    if args.workers < 1:
        raise SteelError(f"--workers {args.workers} must be >= 1")
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise SteelError(f"{run_dir}: run directory not found")
    store = OOFStore(run_dir)
    if len(store) == 0:
        raise SteelError(f"{store.dir}: OOF store has no images")
    out_dir = store.dir.parent
    storage_url = args.storage or default_storage(out_dir)
    study_name = args.study_name or f"thresholds-{Path(args.config).stem if args.config else 'default'}"
    storage = open_storage(storage_url)  # fail fast on a bad URL, before the statistics

    pixel, comp = sweep_grids(cfg)
    t0 = time.perf_counter()
    stats, stats_path = load_or_compute_stats(store, pixel, comp, cfg["mode"], workers=args.workers)
    t_stats = time.perf_counter() - t0
    fast = FastDice(stats, np.asarray(store.cls), store.folds)
    study, interrupted, finished = run_study(
        fast,
        cfg,
        storage_url,
        storage,
        study_name,
        trials,
        args.workers,
        args.seed,
        stats_path=stats_path,
        store_dir=store.dir,
    )
    if not finished:
        raise SteelError(f"study {study_name!r} has no finished trials (run with --trials N > 0)")
    best_trial = study.best_trial
    best = params_from_trial(best_trial.params, cfg)
    default = Params.uniform()
    oof = fast.summary(best)
    oof["objective"] = float(best_trial.value)
    dflt = fast.summary(default)
    summary = {
        "oof_dice": oof,
        "default_dice": dflt,
        "default_params": default.to_dict(),
        "stride": store.stride,
        "trials": len(finished),
        "objective": cfg["objective"],
        "robust_k": float(cfg["robust_k"]),
        "study_name": study_name,
        "storage": _mask_url(storage_url),
        "best_trial": best_trial.number,
        "config": cfg["source"],
        "n_images": len(store),
        **best.to_dict(),
    }
    png = out_dir / "sweep.png"
    plot_curves(fast, cfg, best, dflt, png)
    summary["wandb_run_id"] = log_wandb(out_dir, summary, finished, png, f"sweep-{study_name}")
    best.save(out_dir / THRESHOLDS_FILE, **{k: v for k, v in summary.items() if k not in ("classes", "mode")})
    print(f"statistics: {len(store)} images, stride {store.stride}, {t_stats:.1f} s ({stats_path.name})")
    print(
        f"study {study_name!r}: {len(finished)} finished trials, best #{best_trial.number} objective {best_trial.value:.5f}"
    )
    print(f"OOF dice {oof['mean']:.5f} (default thresholds {dflt['mean']:.5f})")
    for c, p in enumerate(best.classes, 1):
        print(
            f"  class {c}: dice {oof['per_class'][c - 1]:.5f} (default {dflt['per_class'][c - 1]:.5f})  label {p.label} "
            f"pixel {p.pixel} min_area {p.min_area} min_component {p.min_component}"
        )
    print(f"wrote {out_dir / THRESHOLDS_FILE} and {png}")
    return 130 if interrupted else 0


# ------------------------------------------------------------------------------------ synthetic data
def _smooth(rng: np.random.Generator, b: int, h: int, w: int, cell: int) -> np.ndarray:
    """b smooth random fields (b, h, w) float32: N(0, 1) on a grid of ``cell`` pixels, bilinear upsampled."""
    gh, gw = max(2, -(-h // cell) + 1), max(2, -(-w // cell) + 1)
    small = rng.standard_normal((gh, gw, b), dtype=np.float32)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(big.reshape(h, w, b).transpose(2, 0, 1))


def write_synthetic_oof(
    oof_dir: str | os.PathLike,
    n: int,
    height: int = 256,
    width: int = 1600,
    stride: int = 2,
    n_folds: int = 5,
    seed: int = 0,
    chunk: int = 64,
    progress: bool = False,
) -> Path:
    """A random but structured OOF store (blobs of truth, noisy probabilities around them, false-positive blobs,
    classifier probabilities correlated with presence) for tests and benchmarks. Returns the oof dir."""
    rng = np.random.default_rng(seed)
    h, w = strided_shape(height, width, stride)
    ids = [f"{i:06d}.jpg" for i in range(n)]
    folds = rng.permutation(np.arange(n) % n_folds)
    present_p = np.array([0.12, 0.05, 0.45, 0.12])
    cells = [max(2, h // k) for k in (16, 16, 8, 5)]
    with OOFWriter(oof_dir, ids, folds, height, width, stride, meta={"synthetic": True, "seed": seed}) as wr:
        for a in tqdm(range(0, n, chunk), desc="synthetic OOF", disable=not progress, dynamic_ncols=True):
            b = min(n, a + chunk) - a
            present = rng.random((b, N_CLASSES)) < present_p
            masks = np.empty((b, N_CLASSES, h, w), np.float32)
            truth = np.empty((b, N_CLASSES, h, w), np.uint8)
            for c in range(N_CLASSES):
                field = _smooth(rng, b, h, w, cells[c])
                noise = _smooth(rng, b, h, w, max(1, cells[c] // 4))
                pres = present[:, c, None, None]
                truth[:, c] = pres & (field > 0.8)
                # absent class: a damped field (false-positive blobs and specks), or a clean map (60 %)
                clean = (rng.random(b) < 0.6)[:, None, None]
                logit = (
                    np.where(pres, 5.0 * (field - 0.8), 5.0 * (0.6 * field - 0.8) - 2.5 - 6.0 * clean) + noise
                )
                masks[:, c] = 1.0 / (1.0 + np.exp(-logit))
            cls = 1.0 / (1.0 + np.exp(-(np.where(present, 2.0, -2.0) + rng.normal(0.0, 1.5, (b, N_CLASSES)))))
            wr.write(np.arange(a, a + b), cls, masks, truth)
    return Path(oof_dir)
