"""Test-time augmentation and model averaging of probabilities.

TTA transforms are (augment, deaugment) pairs on (B, C, H, W) tensors: the deaugment of a flip is the
same flip, applied to the predicted maps; classifier outputs are invariant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TTA: dict[str, tuple] = {
    "none": (lambda x: x, lambda y: y),
    "hflip": (lambda x: x.flip(-1), lambda y: y.flip(-1)),
    "vflip": (lambda x: x.flip(-2), lambda y: y.flip(-2)),
}


def parse_tta(spec: str | list[str] | None) -> list[str]:
    """'none,hflip,vflip' -> ['none', 'hflip', 'vflip']; SteelError for an unknown name."""
    from steel.errors import SteelError

    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else (spec or ["none"])) if t.strip()]
    bad = [t for t in names if t not in TTA]
    if bad:
        raise SteelError(f"unknown TTA {bad[0]!r}; choose from {', '.join(TTA)}")
    return names or ["none"]


@torch.no_grad()
def predict_batch(
    net: torch.nn.Module, x: torch.Tensor, input_size: tuple[int, int] | list[int] | None = None, tta: list[str] = ("none",)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask probs (B, 4, H, W) and class probs (B, 4) of a net on x (B, 1, H, W) float in [0, 1].

    The image is resized to ``input_size`` (H', W') when given and the maps back to (H, W); maps and class
    probabilities are averaged over the TTA transforms.
    """
    h, w = x.shape[-2:]
    if input_size is not None and tuple(input_size) != (h, w):
        x = F.interpolate(x, size=tuple(input_size), mode="bilinear", align_corners=False)
    masks, labels = 0.0, 0.0
    for name in tta:
        aug, deaug = TTA[name]
        out = net(aug(x))
        masks = masks + deaug(torch.sigmoid(out["mask"].float()))
        labels = labels + torch.sigmoid(out["label"].float())
    masks, labels = masks / len(tta), labels / len(tta)
    if masks.shape[-2:] != (h, w):
        masks = F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)
    return masks, labels
