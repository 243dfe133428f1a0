"""TwoHeadNet: an smp segmentation architecture x any smp / ``tu-`` timm encoder, with smp's classification head.

Input contract (every caller): x float (B, 1, H, W) in [0, 1] (grey image / 255), H and W multiples of 32.
Normalisation (ImageNet statistics, grey = mean of the three channels) happens inside as buffers; with
``in_channels=3`` the grey channel is repeated inside. Output: {"mask": logits (B, 4, H, W), "label": logits (B, 4)}.
``steel export`` puts it in one torch.export program (the dict output is fine there). Resizing/padding native images to
the net's input size, TTA and the probabilities at native size: ``steel.ensemble``.
"""

from __future__ import annotations

import math
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

from steel import N_CLASSES
from steel.errors import SteelError

# flat registry: lower-case name -> smp class (Unet, UnetPlusPlus, FPN, PSPNet, DeepLabV3, DeepLabV3Plus, Linknet,
# MAnet, PAN, UPerNet, Segformer, DPT, ... whatever this smp version has)
ARCHS: dict[str, type[nn.Module]] = dict(smp.MODEL_ARCHITECTURES_MAPPING)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def arch_class(arch: str) -> type[nn.Module]:
    """The smp class of an architecture name (case-insensitive); SteelError listing the known names."""
    key = arch.lower().replace("_", "").replace("-", "")
    if key not in ARCHS:
        raise SteelError(f"arch {arch!r}: choose one of {', '.join(sorted(ARCHS))}")
    return ARCHS[key]


class TwoHeadNet(nn.Module):
    """Segmentation + classification net on (B, 1, H, W) grey input in [0, 1].

    Args:
        arch: smp architecture name (Unet, FPN, PSPNet, DeepLabV3Plus, Linknet, ...).
        encoder: smp encoder name or ``tu-<timm name>``.
        encoder_weights: pretrained weights name (e.g. "imagenet") or None (no download).
        in_channels: 1 (grey straight in) or 3 (grey repeated, for RGB-pretrained stems).
        classes: number of defect classes (4).
        dropout: dropout of the classification head.
        pooling: "avg" or "max" pooling of the classification head.
        arch_kwargs: extra keyword arguments of the smp architecture (decoder_channels, ...; Unet and UnetPlusPlus
            take ``decoder_attention_type: scse``, spatial + channel squeeze-excitation in every decoder block).
        mask_prior: if set, the mask head's bias starts at logit(mask_prior) (e.g. 0.01) so that training does
            not begin by predicting defects everywhere (the focal-loss paper's prior initialisation).
    """

    def __init__(
        self,
        arch: str = "Unet",
        encoder: str = "resnet18",
        encoder_weights: str | None = None,
        in_channels: int = 1,
        classes: int = N_CLASSES,
        dropout: float = 0.2,
        pooling: str = "avg",
        arch_kwargs: dict[str, Any] | None = None,
        mask_prior: float | None = None,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise SteelError(f"in_channels {in_channels}: must be 1 (grey) or 3 (grey repeated)")
        cls = arch_class(arch)
        aux = {"classes": classes, "dropout": dropout, "pooling": pooling}
        try:
            self.net = cls(
                encoder_name=encoder,
                encoder_weights=encoder_weights,
                in_channels=in_channels,
                classes=classes,
                aux_params=aux,
                **(arch_kwargs or {}),
            )
        except (KeyError, ValueError, RuntimeError, TypeError) as e:  # TypeError: an option the arch lacks
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SteelError(f"cannot build {arch} with encoder {encoder!r}: {msg}") from None
        if mask_prior is not None:
            if not 0.0 < mask_prior < 1.0:
                raise SteelError(f"mask_prior {mask_prior}: must be in (0, 1)")
            head = [m for m in self.net.segmentation_head.modules() if isinstance(m, nn.Conv2d)][-1]
            nn.init.constant_(head.bias, math.log(mask_prior / (1.0 - mask_prior)))
        self.in_channels = in_channels
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        if in_channels == 1:
            mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, 1, H, W) in [0, 1] -> {"mask": (B, C, H, W) logits, "label": (B, C) logits}."""
        if self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        mask, label = self.net(x)
        return {"mask": mask, "label": label}
