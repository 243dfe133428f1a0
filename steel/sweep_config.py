"""Sweep configuration (``sweeps/*.yaml``): search kind, objective, gating mode, TPE sampler and the per-class
space of the post-processing parameters (label gate, pixel threshold, min-area, component size, and in scaled
mode the scale of the pixel threshold by the class probability).

``DEFAULT_CONFIG`` is ``sweeps/default.yaml``; a file overrides any part of it, ``classes`` overrides the space
of single classes. ``load_config`` validates and adds ``dims`` (per class {key: Dim}); errors are SteelErrors
naming the file and key.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steel import N_CLASSES
from steel.errors import SteelError
from steel.postprocess import MODES, PARAM_KEYS, SCALE_MAX

DEFAULT_CONFIG: dict[str, Any] = {
    "search": "exact",
    "trials": 200,
    "objective": "mean",
    "robust_k": 1.0,
    "mode": "hard",
    "top_k": 3,
    "sampler": {"n_startup_trials": 20, "multivariate": True, "n_ei_candidates": 24},
    "space": {
        "label": {"low": 0.3, "high": 0.9, "step": 0.05},
        "pixel": {"low": 0.3, "high": 0.7, "step": 0.05},
        "min_area": {"low": 0, "high": 3000, "step": 100},
        "min_component": {"low": 0, "high": 300, "step": 50},
        "scale": {"low": 0, "high": 1.5, "step": 0.5},
    },
    "classes": {},
}
CONFIG_KEYS = set(DEFAULT_CONFIG)
SAMPLER_KEYS = set(DEFAULT_CONFIG["sampler"])
OBJECTIVES = ("mean", "robust")
SEARCHES = ("exact", "tpe")
SPACE_KEYS = (*PARAM_KEYS, "scale")  # scale: searched in scaled mode only


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
    if key == "scale" and not (0.0 <= lo and hi < SCALE_MAX):
        raise SteelError(f"{where}: scale range [{lo}, {hi}] must lie in [0, {SCALE_MAX:g})")
    if not integer and key != "scale" and not (0.0 <= lo and hi <= 1.0):
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
        nested = isinstance(v, dict) and isinstance(out.get(k), dict) and k != "classes"
        out[k] = _merge(out[k], v) if nested else v
    return out


def _int(cfg: dict, key: str, least: int, where: str, section: str = "") -> None:
    v = (cfg[section] if section else cfg)[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise SteelError(
            f"{where}: {(section + ' ') if section else ''}{key} {v!r} must be an integer >= {least}"
        )


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
    _int(cfg, "n_startup_trials", 0, where, "sampler")
    _int(cfg, "n_ei_candidates", 1, where, "sampler")
    if not isinstance(cfg["sampler"]["multivariate"], bool):
        raise SteelError(
            f"{where}: sampler multivariate {cfg['sampler']['multivariate']!r} must be true or false"
        )
    if set(cfg["space"]) != set(SPACE_KEYS):
        bad = sorted(set(cfg["space"]) ^ set(SPACE_KEYS))[0]
        raise SteelError(f"{where}: space key {bad!r} unknown or missing (expected {', '.join(SPACE_KEYS)})")
    _int(cfg, "trials", 0, where)
    _int(cfg, "top_k", 1, where)
    for key, allowed in (("search", SEARCHES), ("objective", OBJECTIVES), ("mode", MODES)):
        if cfg[key] not in allowed:
            raise SteelError(f"{where}: {key} {cfg[key]!r} is not one of {', '.join(allowed)}")
    rk = cfg["robust_k"]
    if isinstance(rk, bool) or not isinstance(rk, int | float) or not math.isfinite(rk) or rk < 0:
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
        if not isinstance(over, dict) or set(over) - set(SPACE_KEYS):
            raise SteelError(f"{where}: classes.{c} may only override {', '.join(SPACE_KEYS)}; got {over!r}")
        space = _merge(cfg["space"], over)  # a partial {low, high, step} inherits the rest
        dims.append({k: _dim(space[k], k, f"{where}: class {c}") for k in SPACE_KEYS})
    cfg["classes"] = classes
    cfg["dims"] = dims
    cfg["source"] = where
    return cfg


def space_signature(cfg: dict[str, Any], search: str) -> str:
    """What makes two runs' trials comparable in one study: search kind, per-class space, mode, objective."""
    keys = SPACE_KEYS if cfg["mode"] == "scaled" else PARAM_KEYS  # a hard / soft study's space has no scale
    dims = [{k: [d.low, d.high, d.step] for k, d in cd.items() if k in keys} for cd in cfg["dims"]]
    sig = {"search": search, "dims": dims, "mode": cfg["mode"], "objective": cfg["objective"],
           "robust_k": float(cfg["robust_k"])}  # fmt: skip
    return json.dumps(sig, sort_keys=True)


def sweep_grids(cfg: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Union over classes of the pixel-threshold grid (P,) and of the component-size grid (K,), 0 first."""
    pix = sorted({v for cd in cfg["dims"] for v in cd["pixel"].values()})
    comp = sorted({0, *(v for cd in cfg["dims"] for v in cd["min_component"].values())})
    return np.array(pix, dtype=np.float64), np.array(comp, dtype=np.float64)


def scale_grid(cfg: dict[str, Any]) -> list[float]:
    """Scales to compute statistics for: scaled mode, 0 (= hard: the default thresholds) and the union over
    classes of the scale grid; [0.0] in hard and soft mode."""
    if cfg["mode"] != "scaled":
        return [0.0]
    return sorted({0.0, *(float(v) for cd in cfg["dims"] for v in cd["scale"].values())})
