"""Post-processing of mask probabilities: label gate, pixel threshold, small-component removal, min-area.

For class c (params in full-resolution pixels; at a stride s an area of a counts as a * s * s):
  1. ``mask = prob_c >= pixel_c`` (hard), ``prob_c * cls_c >= pixel_c`` (soft gating) or
     ``prob_c >= pixel_c * (1 + scale_c * (0.5 - cls_c))`` (scaled);
  2. 8-connected components with ``size * s * s < min_component_c`` are removed;
  3. the whole mask is dropped if ``cls_c < label_c`` or its remaining ``area * s * s < min_area_c``.
Gating ("mode"): hard = step 1 thresholds the mask probability; soft = it thresholds the product with the
class probability (4th place soft gating); scaled = the class probability scales the pixel threshold
(55th place): ``pixel_c`` at ``cls_c = 0.5``, lower on images the classifier is sure of (``pixel_c * (1 -
scale_c / 2)`` at ``cls_c = 1``), higher on doubtful ones; ``scale_c`` in [0, 2) is tuned like the other
parameters, and ``scale_c = 0`` is hard mode exactly. In every mode the label gate of step 3 applies. The val/dice rule of
``SteelModule`` is one such ``Params`` (``gating_params``), with "none" meaning hard with no label gate.
Comparisons are done in the dtype of the probabilities (thresholds are cast to it), so the numpy, torch
and sweep paths agree bit for bit. ``Params`` reads/writes the ``thresholds.json`` contract.

``postprocess`` is the numpy reference (one image); ``postprocess_torch`` (batched, TorchScript-scriptable)
lives in ``steel._torch_postprocess`` and is imported from here lazily, so numpy users never import torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from steel import N_CLASSES
from steel.errors import SteelError
from steel.io import read_json, write_json

MODES = ("hard", "soft", "scaled")
GATINGS = ("none", "hard", "soft")  # SteelModule's val/dice rules: MODES plus "none" (mask head alone)
PARAM_KEYS = ("label", "pixel", "min_area", "min_component")
SCALE_MAX = 2.0  # scaled mode: scale < 2 keeps the threshold above 0 for every class probability in [0, 1]
THRESHOLDS_FILE = "thresholds.json"


@dataclass(frozen=True)
class ClassParams:
    """Thresholds of one class: label gate and pixel threshold in [0, 1], areas in full-res pixels, and the
    scaled mode's ``scale`` in [0, 2) (0 in the other modes)."""

    label: float = 0.5
    pixel: float = 0.5
    min_area: float = 0
    min_component: float = 0
    scale: float = 0


@dataclass(frozen=True)
class Params:
    """Post-processing parameters of the 4 classes plus the gating mode (``hard`` or ``soft``)."""

    classes: tuple[ClassParams, ...] = field(default_factory=lambda: (ClassParams(),) * N_CLASSES)
    mode: str = "hard"

    def __post_init__(self) -> None:
        if len(self.classes) != N_CLASSES:
            raise SteelError(f"thresholds: {len(self.classes)} classes, expected {N_CLASSES}")
        if self.mode not in MODES:
            raise SteelError(f"thresholds: mode {self.mode!r} is not one of {', '.join(MODES)}")
        for c, p in enumerate(self.classes, 1):
            for key in ("label", "pixel"):
                v = getattr(p, key)
                if not (isinstance(v, int | float) and 0.0 <= v <= 1.0):
                    raise SteelError(f"thresholds: class {c} {key} = {v!r} is not a number in [0, 1]")
            for key in ("min_area", "min_component"):
                v = getattr(p, key)
                if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                    raise SteelError(f"thresholds: class {c} {key} = {v!r} is not a number >= 0")
            s = p.scale
            if not (isinstance(s, int | float) and 0.0 <= s < SCALE_MAX):
                raise SteelError(f"thresholds: class {c} scale = {s!r} is not a number in [0, {SCALE_MAX:g})")
            if s != 0 and self.mode != "scaled":
                raise SteelError(f"thresholds: class {c} scale = {s!r} needs mode scaled, not {self.mode}")

    @classmethod
    def uniform(
        cls,
        label: float = 0.5,
        pixel: float = 0.5,
        min_area: float = 0,
        min_component: float = 0,
        mode: str = "hard",
    ) -> Params:
        """The same thresholds for every class (the default: 0.5 / 0.5 / 0 / 0, hard)."""
        return cls((ClassParams(label, pixel, min_area, min_component),) * N_CLASSES, mode)

    def arrays(self) -> dict[str, np.ndarray]:
        """{'label', 'pixel', 'min_area', 'min_component', 'scale'} -> float64 arrays (4,), e.g. for
        ``postprocess_torch``."""
        return {k: np.array([getattr(p, k) for p in self.classes], dtype=np.float64) for k in self.keys()}

    def keys(self) -> tuple[str, ...]:
        """The parameters of a class in this mode: ``PARAM_KEYS``, plus ``scale`` in scaled mode."""
        return (*PARAM_KEYS, "scale") if self.mode == "scaled" else PARAM_KEYS

    def to_dict(self) -> dict[str, Any]:
        """The ``classes`` and ``mode`` part of thresholds.json (``scale`` only in scaled mode)."""
        keys = self.keys()
        classes = {
            str(c): {k: v for k, v in asdict(p).items() if k in keys} for c, p in enumerate(self.classes, 1)
        }
        return {"classes": classes, "mode": self.mode}

    @classmethod
    def from_dict(cls, d: Any, source: str = "thresholds") -> Params:
        """Parse the thresholds.json layout; SteelError naming ``source`` and the bad key/value."""
        if not isinstance(d, dict) or not isinstance(d.get("classes"), dict):
            raise SteelError(f"{source}: expected an object with a 'classes' mapping")
        want = {str(c) for c in range(1, N_CLASSES + 1)}
        if set(d["classes"]) != want:
            raise SteelError(f"{source}: classes {sorted(d['classes'])} must be exactly {sorted(want)}")
        out = []
        for c in sorted(want):
            p = d["classes"][c]
            if not isinstance(p, dict) or set(p) - {*PARAM_KEYS, "scale"} or not {"label", "pixel"} <= set(p):
                raise SteelError(
                    f"{source}: class {c} needs keys label, pixel[, min_area, min_component, scale], got {p!r}"
                )
            bad = [k for k, v in p.items() if isinstance(v, bool) or not isinstance(v, int | float)]
            if bad:
                raise SteelError(f"{source}: class {c} {bad[0]} = {p[bad[0]]!r} is not a number")
            out.append(ClassParams(**p))
        try:
            return cls(tuple(out), d.get("mode", "hard"))
        except SteelError as e:
            raise SteelError(f"{source}: {str(e).removeprefix('thresholds: ')}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Params:
        """Read thresholds.json (or a run/ensemble dir containing it)."""
        path = Path(path)
        if path.is_dir():
            path = path / THRESHOLDS_FILE
        if not path.is_file():
            raise SteelError(f"{path}: thresholds file not found (run `steel sweep` first)")
        try:
            d = read_json(path)
        except ValueError as e:
            raise SteelError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, str(path))

    def save(self, path: str | os.PathLike, **extra: Any) -> None:
        """Write thresholds.json atomically: ``to_dict()`` plus ``extra`` keys (oof_dice, stride, trials, ...)."""
        write_json(path, {**extra, **self.to_dict()})


def gating_params(gating: str = "hard", pixel: float = 0.5, label: float = 0.5) -> Params:
    """The val/dice decision rule as Params (no min-area, no component removal): ``hard`` / ``soft`` as in
    ``Params.mode`` with label gate ``label``; ``none`` = hard without a label gate (label 0)."""
    if gating not in GATINGS:
        raise SteelError(f"gating {gating!r}: choose one of {', '.join(GATINGS)}")
    if gating == "none":
        return Params.uniform(0.0, pixel, 0, 0, "hard")
    return Params.uniform(label, pixel, 0, 0, gating)


def pixel_thresholds(pixel: Any, cls: Any, scale: Any, dtype: Any = np.float32) -> np.ndarray:
    """Scaled mode's threshold ``pixel * (1 + scale * (0.5 - cls))``, computed in ``dtype`` in this order (so
    numpy, torch and the sweep agree bit for bit); pixel / scale broadcast against cls. scale 0 -> pixel."""
    t = np.dtype(dtype).type
    one, half = t(1.0), t(0.5)
    return np.asarray(pixel, dtype) * (one + np.asarray(scale, dtype) * (half - np.asarray(cls, dtype)))


def remove_small_components(mask: np.ndarray, min_size: float, stride: int = 1) -> np.ndarray:
    """bool (H, W) without its 8-connected components of ``size * stride**2 < min_size``."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    if min_size <= 0 or not mask.any():
        return mask
    _, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    sizes = np.bincount(labels.ravel())
    keep = sizes * (stride * stride) >= min_size
    keep[0] = False
    return keep[labels]


def postprocess(prob: np.ndarray, cls_prob: np.ndarray, params: Params, stride: int = 1) -> np.ndarray:
    """Binary masks bool (4, H, W) from mask probabilities (4, H, W) in [0, 1] and class probabilities (4,).

    ``prob`` may also be uint8 quantised ``round(p * 255)`` (the OOF store's masks): it is read as float32 q / 255.

    ``stride``: the maps are the full-resolution maps taken at ``[::stride, ::stride]``, so areas are
    multiplied by ``stride**2`` before being compared with ``min_area`` / ``min_component``.
    """
    prob = np.asarray(prob)
    if (
        prob.dtype == np.uint8
    ):  # quantised round(p * 255), as in the OOF store: dequantise like OOFStore.probs
        prob = prob.astype(np.float32) / 255.0
    elif not np.issubdtype(prob.dtype, np.floating):
        raise TypeError(f"postprocess: prob must be float in [0, 1] or quantised uint8, got {prob.dtype}")
    cls_prob = np.asarray(cls_prob)
    if not np.issubdtype(cls_prob.dtype, np.floating):
        cls_prob = cls_prob.astype(np.float32)
    if prob.ndim != 3 or prob.shape[0] != N_CLASSES or cls_prob.shape != (N_CLASSES,):
        raise ValueError(
            f"postprocess: prob {prob.shape} / cls_prob {cls_prob.shape}, expected (4, H, W) / (4,)"
        )
    ptype, ctype = prob.dtype.type, cls_prob.dtype.type
    out = np.zeros(prob.shape, dtype=bool)
    for c, p in enumerate(params.classes):
        if cls_prob[c] < ctype(p.label):
            continue
        if params.mode == "soft":
            m = prob[c] * ptype(cls_prob[c]) >= ptype(p.pixel)
        else:  # hard is scaled with scale 0: the threshold is the pixel threshold itself
            m = prob[c] >= pixel_thresholds(p.pixel, cls_prob[c], p.scale, prob.dtype)
        m = remove_small_components(m, p.min_component, stride)
        if int(m.sum()) * stride * stride < p.min_area:
            continue
        out[c] = m
    return out


def __getattr__(name: str):
    if name in ("postprocess_torch", "component_sizes_torch"):  # torch only when asked for
        from steel import _torch_postprocess

        return getattr(_torch_postprocess, name)
    raise AttributeError(name)
