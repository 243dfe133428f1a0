"""Losses: weighted sums of smp losses for the mask head, and BCE for the label head.

Config form (LightningCLI ``model.seg_loss``)::

    seg_loss: {name: bce_dice, bce_weight: 0.75, dice_weight: 0.25, pos_weight: [2, 2, 1, 1.5]}

``name`` picks the parts (registry ``SEG_LOSSES``); ``<part>_weight`` overrides a part's weight; the other keys
are options of the parts: pos_weight / smooth_factor (bce), smooth / log_loss (dice), alpha / gamma (focal),
per_image (lovasz). Every loss takes logits (B, C, H, W) and targets (B, C, H, W) 0/1 and returns
(total, {part: value}).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from segmentation_models_pytorch import losses as smp_losses
from torch import nn

from steel.errors import SteelError


def _pos_weight(value: float | Sequence[float] | None, ndim_tail: int) -> torch.Tensor | None:
    """Per-class positive weight as a tensor broadcastable over (B, C, *tail)."""
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.ndim == 0:
        return t
    return t.view(-1, *([1] * ndim_tail))


class LovaszHinge(nn.Module):
    """Lovasz hinge of each (image, class) (``per_image=True``) or each class over the batch, averaged.

    Wraps smp's binary Lovasz on (B * C) or C flattened problems instead of smp's one flattened multilabel problem.
    """

    def __init__(self, per_image: bool = True) -> None:
        super().__init__()
        self.per_image = per_image
        self.loss = smp_losses.LovaszLoss(mode="binary", per_image=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b, c = logits.shape[:2]
        if self.per_image:
            return self.loss(logits.reshape(b * c, -1), target.reshape(b * c, -1))
        return self.loss(logits.transpose(0, 1).reshape(c, -1), target.transpose(0, 1).reshape(c, -1))


def _smooth(value: float | None, where: str) -> float | None:
    """Label smoothing factor s (targets 0/1 -> s / 1 - s); SteelError unless 0 <= s < 0.5."""
    if value is not None and not 0.0 <= float(value) < 0.5:
        raise SteelError(
            f"{where} smooth_factor {value}: must be in [0, 0.5) (targets 0/1 become s and 1 - s)"
        )
    return None if value is None else float(value)


def _bce(pos_weight: float | Sequence[float] | None = None, smooth_factor: float | None = None) -> nn.Module:
    smooth_factor = _smooth(smooth_factor, "seg_loss")
    return smp_losses.SoftBCEWithLogitsLoss(
        pos_weight=_pos_weight(pos_weight, 2), smooth_factor=smooth_factor, ignore_index=None
    )


def _dice(smooth: float = 0.0, log_loss: bool = False) -> nn.Module:
    return smp_losses.DiceLoss(mode="multilabel", from_logits=True, smooth=smooth, log_loss=log_loss)


def _focal(alpha: float | None = None, gamma: float = 2.0) -> nn.Module:
    return smp_losses.FocalLoss(mode="multilabel", alpha=alpha, gamma=gamma)


def _lovasz(per_image: bool = True) -> nn.Module:
    return LovaszHinge(per_image=per_image)


# part name -> (factory, its option names)
PARTS: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {
    "bce": (_bce, ("pos_weight", "smooth_factor")),
    "dice": (_dice, ("smooth", "log_loss")),
    "focal": (_focal, ("alpha", "gamma")),
    "lovasz": (_lovasz, ("per_image",)),
}

# flat registry: loss name -> default weight of each part
SEG_LOSSES: dict[str, dict[str, float]] = {
    "bce": {"bce": 1.0},
    "dice": {"dice": 1.0},
    "bce_dice": {"bce": 0.75, "dice": 0.25},
    "focal": {"focal": 1.0},
    "bce_focal": {"bce": 0.5, "focal": 0.5},
    "focal_dice": {"focal": 0.5, "dice": 0.5},
    "lovasz": {"lovasz": 1.0},
    "bce_lovasz": {"bce": 0.5, "lovasz": 0.5},
}


class WeightedLoss(nn.Module):
    """Sum of weighted parts; forward(logits, target) -> (total, {part: unweighted value})."""

    def __init__(self, parts: dict[str, nn.Module], weights: dict[str, float]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.weights = dict(weights)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, target = logits.float(), target.float()
        values = {name: part(logits, target) for name, part in self.parts.items()}
        total = sum(self.weights[name] * v for name, v in values.items())
        return total, values


def build_seg_loss(config: dict[str, Any] | str | None = None) -> WeightedLoss:
    """Mask loss from a config dict ``{name, <part>_weight, options...}`` or a bare name (default bce_dice)."""
    cfg = {"name": config} if isinstance(config, str) else dict(config or {"name": "bce_dice"})
    name = cfg.pop("name", "bce_dice")
    if name not in SEG_LOSSES:
        raise SteelError(f"seg_loss name {name!r}: choose one of {', '.join(SEG_LOSSES)}")
    weights = dict(SEG_LOSSES[name])
    for key in [k for k in cfg if k.endswith("_weight") and k[: -len("_weight")] in PARTS]:
        part = key[: -len("_weight")]
        if part not in weights:
            raise SteelError(
                f"seg_loss {name!r} has no part {part!r} (parts: {', '.join(weights)}); drop {key}"
            )
        weights[part] = float(cfg.pop(key))
    parts = {}
    for part in weights:
        factory, options = PARTS[part]
        parts[part] = factory(**{k: cfg[k] for k in options if k in cfg})
    used = {k for part in weights for k in PARTS[part][1]}
    unknown = sorted(set(cfg) - used)
    if unknown:
        raise SteelError(
            f"seg_loss {name!r}: unknown option {unknown[0]!r} (options: {', '.join(sorted(used)) or 'none'})"
        )
    return WeightedLoss(parts, weights)


class ClsLoss(nn.Module):
    """Label-head BCE with optional per-class pos_weight and label smoothing (``smooth_factor`` s: the targets
    0/1 become s/1 - s, 7th place): logits (B, C), labels (B, C) -> scalar."""

    def __init__(
        self, pos_weight: float | Sequence[float] | None = None, smooth_factor: float | None = None
    ) -> None:
        super().__init__()
        self.loss = smp_losses.SoftBCEWithLogitsLoss(
            pos_weight=_pos_weight(pos_weight, 0),
            smooth_factor=_smooth(smooth_factor, "cls_loss"),
            ignore_index=None,
        )

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(logits.float(), labels.float())


def build_cls_loss(config: dict[str, Any] | None = None) -> ClsLoss:
    """Label loss from ``{name: bce, pos_weight: [...], smooth_factor: x}`` (only bce exists)."""
    cfg = dict(config or {})
    name = cfg.pop("name", "bce")
    if name != "bce":
        raise SteelError(f"cls_loss name {name!r}: only 'bce' is available")
    unknown = sorted(set(cfg) - {"pos_weight", "smooth_factor"})
    if unknown:
        raise SteelError(f"cls_loss: unknown option {unknown[0]!r} (options: pos_weight, smooth_factor)")
    return ClsLoss(**cfg)
