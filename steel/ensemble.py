"""THE inference path: fold nets -> native-size probabilities, used by validation (val/dice), ``steel predict
--config``, the OOF store, blends, the export and ``steel predict``.

For one fold net and a native batch x float (B, 1, H, W) in [0, 1] (grey / 255; the ImageNet normalisation
is inside the net):
  1. ``to_model_size``: bilinear resize to the net's ``input_size`` (or, when None, replicate-pad at the
     bottom/right to multiples of 32);
  2. every TTA view (``augment``) goes through the net; its mask *probabilities* (sigmoid) are mapped back
     (``deaugment``) and averaged over the views, as are the class probabilities;
  3. ``to_native``: the averaged mask probabilities are resized back to (H, W) (or cropped) -- probabilities,
     never logits, are resized.
A ``Member`` (the fold nets of one run) raises each fold's maps to ``power`` and averages the folds; an
``Ensemble`` takes the weighted mean of its members and applies the decision rule of ``steel.postprocess``.
Validation is the one-fold, no-TTA case: ``SteelModule`` calls ``to_model_size`` and ``views_to_probs``
itself only to keep the logits for its loss. Everything here is TorchScript-scriptable.
"""

# no "from __future__ import annotations": TorchScript reads the class attribute annotations as live types
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from steel.errors import SteelError
from steel.postprocess import Params, postprocess_torch

TTA = ("none", "hflip", "vflip")  # names of the augment/deaugment pairs below


def augment(x: torch.Tensor, name: str) -> torch.Tensor:
    """The TTA view ``name`` of a batch (B, C, H, W): none, hflip (mirror columns), vflip (mirror rows)."""
    if name == "hflip":
        return x.flip(-1)
    if name == "vflip":
        return x.flip(-2)
    if name == "none":
        return x
    raise ValueError("steel ensemble: unknown TTA " + name)


def deaugment(y: torch.Tensor, name: str) -> torch.Tensor:
    """A per-pixel output (B, C, H, W) of the view ``name`` mapped back to the geometry of the original batch."""
    if name == "hflip":
        return y.flip(-1)
    if name == "vflip":
        return y.flip(-2)
    if name == "none":
        return y
    raise ValueError("steel ensemble: unknown TTA " + name)


def parse_tta(spec: str | list[str] | None) -> list[str]:
    """'none,hflip,vflip' -> ['none', 'hflip', 'vflip']; SteelError for an unknown or repeated name."""
    names = [
        t.strip() for t in (spec.split(",") if isinstance(spec, str) else (spec or ["none"])) if t.strip()
    ]
    bad = [t for t in names if t not in TTA]
    if bad:
        raise SteelError(f"unknown TTA {bad[0]!r}; choose from {', '.join(TTA)}")
    if len(set(names)) != len(names):
        raise SteelError(f"TTA {','.join(names)}: a transform is listed twice")
    return names or ["none"]


# Optional[...] in the signatures below: TorchScript does not parse "X | None" in function annotations
def to_model_size(x: torch.Tensor, input_size: Optional[list[int]]) -> torch.Tensor:  # noqa: UP045
    """Native x (B, C, H, W) -> what the net sees: resized (bilinear) to ``input_size`` [h, w] when given and
    different, else replicate-padded at the bottom/right to multiples of 32."""
    h, w = x.shape[-2], x.shape[-1]
    if input_size is not None and (input_size[0] != h or input_size[1] != w):
        return F.interpolate(x, size=(input_size[0], input_size[1]), mode="bilinear", align_corners=False)
    ph, pw = (32 - h % 32) % 32, (32 - w % 32) % 32
    if ph > 0 or pw > 0:
        return F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x


def to_native(y: torch.Tensor, h: int, w: int, input_size: Optional[list[int]]) -> torch.Tensor:  # noqa: UP045
    """Per-pixel maps (B, C, h', w') at the net's size -> (B, C, h, w): the inverse of ``to_model_size``
    (bilinear resize back, or crop of the padding)."""
    if input_size is not None and (input_size[0] != h or input_size[1] != w):
        return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
    return y[..., :h, :w]


def views_to_probs(
    masks: list[torch.Tensor],
    labels: list[torch.Tensor],
    tta: list[str],
    h: int,
    w: int,
    input_size: Optional[list[int]],  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one net on the TTA views of its input (mask (B, 4, h', w') and label (B, 4) per view, in the
    order of ``tta``) -> native (mask probs (B, 4, h, w), class probs (B, 4)): sigmoid, deaugment, mean over
    the views, then ``to_native``."""
    p = deaugment(torch.sigmoid(masks[0].float()), tta[0])
    c = torch.sigmoid(labels[0].float())
    for i in range(1, len(tta)):
        p = p + deaugment(torch.sigmoid(masks[i].float()), tta[i])
        c = c + torch.sigmoid(labels[i].float())
    n = float(len(tta))
    return to_native(p / n, h, w, input_size), c / n


class Member(nn.Module):
    """The fold nets of one run: x float (B, 1, H, W) in [0, 1] -> (mask probs (B, 4, H, W), class probs (B, 4)).

    Each fold net's native-size probabilities (module docstring) are raised to ``power``; the member is their
    mean over the folds.
    """

    input_size: list[int] | None
    tta: list[str]
    power: float

    def __init__(
        self,
        nets: list[nn.Module],
        input_size: list[int] | tuple[int, int] | None = None,
        tta: list[str] | tuple[str, ...] = ("none",),
        power: float = 1.0,
    ) -> None:
        super().__init__()
        if not nets:
            raise SteelError("a member needs at least one fold net")
        self.nets = nn.ModuleList(nets)
        self.input_size = [int(v) for v in input_size] if input_size is not None else None
        self.tta = parse_tta(list(tta))
        self.power = float(power)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2], x.shape[-1]
        xin = to_model_size(x, self.input_size)
        masks = torch.zeros(0, device=x.device)
        cls = torch.zeros(0, device=x.device)
        first = True
        for net in self.nets:
            views_mask: list[torch.Tensor] = []
            views_label: list[torch.Tensor] = []
            for name in self.tta:
                out = net(augment(xin, name))
                views_mask.append(out["mask"])
                views_label.append(out["label"])
            p, c = views_to_probs(views_mask, views_label, self.tta, h, w, self.input_size)
            if self.power != 1.0:
                p, c = p.pow(self.power), c.pow(self.power)
            if first:
                masks, cls, first = p, c, False
            else:
                masks, cls = masks + p, cls + c
        k = float(len(self.nets))
        return masks / k, cls / k


def normalise_weights(weights: list[float] | None, n: int) -> list[float]:
    """Member weights normalised to sum 1 (None: equal); SteelError for a wrong count or bad values."""
    if weights is None:
        return [1.0 / n] * n
    w = [float(v) for v in weights]
    if len(w) != n:
        raise SteelError(f"--weights has {len(w)} values for {n} members")
    if any(not np.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
        raise SteelError(
            f"--weights {','.join(map(str, weights))}: need finite values >= 0 with a positive sum"
        )
    return [v / sum(w) for v in w]


class Ensemble(nn.Module):
    """Members + blending + the tuned post-processing (``steel.postprocess``), on uint8 images.

    forward(images uint8 (B, H, W) grey or (B, H, W, 3) RGB) -> (masks bool (B, 4, H, W), class probs
    float32 (B, 4), blended mask probs float32 (B, 4, H, W)). RGB is converted to grey like OpenCV
    (fixed point: (9798 R + 19235 G + 3735 B + 16384) >> 15, bit-exact with cv2.cvtColor RGB2GRAY).
    """

    weights: list[float]
    soft: bool

    def __init__(
        self, members: list[Member], weights: list[float] | None = None, params: Params | Any = None
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.weights = normalise_weights(weights, len(members))
        params = params if params is not None else Params.uniform()
        arr = params.arrays()
        self.register_buffer("label_thr", torch.tensor(arr["label"], dtype=torch.float32))
        self.register_buffer("pixel_thr", torch.tensor(arr["pixel"], dtype=torch.float32))
        self.register_buffer("min_area", torch.tensor(arr["min_area"], dtype=torch.float64))
        self.register_buffer("min_component", torch.tensor(arr["min_component"], dtype=torch.float64))
        self.register_buffer(
            "scale_thr", torch.tensor([p.scale for p in params.classes], dtype=torch.float32)
        )
        self.soft = params.mode == "soft"

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W) or (B, H, W, 3) -> float (B, 1, H, W) in [0, 1]."""
        if images.dtype != torch.uint8:
            raise RuntimeError("steel ensemble: images must be uint8 (B, H, W) grey or (B, H, W, 3) RGB")
        if images.dim() == 4 and images.shape[-1] == 3:
            rgb = images.to(torch.int32)
            grey = (rgb[..., 0] * 9798 + rgb[..., 1] * 19235 + rgb[..., 2] * 3735 + 16384) >> 15
            return (grey.float() / 255.0).unsqueeze(1)
        if images.dim() == 3:
            return (images.float() / 255.0).unsqueeze(1)
        raise RuntimeError("steel ensemble: images must be uint8 (B, H, W) grey or (B, H, W, 3) RGB")

    def probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x float (B, 1, H, W) in [0, 1] -> blended (mask probs (B, 4, H, W), class probs (B, 4))."""
        masks = torch.zeros(0, device=x.device)
        cls = torch.zeros(0, device=x.device)
        i = 0
        for member in self.members:
            m, c = member(x)
            wt = self.weights[i]
            if i == 0:
                masks, cls = m * wt, c * wt
            else:
                masks, cls = masks + m * wt, cls + c * wt
            i += 1
        return masks, cls

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs, cls = self.probs(self.to_input(images))
        masks = postprocess_torch(
            probs,
            cls,
            self.label_thr,
            self.pixel_thr,
            self.min_area,
            self.min_component,
            self.soft,
            1,
            self.scale_thr,
        )
        return masks, cls, probs


@torch.no_grad()
def predict_batch(
    net: nn.Module,
    x: torch.Tensor,
    input_size: tuple[int, int] | list[int] | None = None,
    tta: list[str] | tuple[str, ...] = ("none",),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask probs (B, 4, H, W) and class probs (B, 4) of one fold net on x (B, 1, H, W) float in [0, 1]:
    the ``Member`` of that single net."""
    return Member([net], input_size, list(tta))(x)
