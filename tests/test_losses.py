"""Losses against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from steel.errors import SteelError
from steel.losses import SEG_LOSSES, build_cls_loss, build_seg_loss

LN2 = math.log(2.0)


def _pair(first: list[float], others: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits zeros (1, 4, 1, 2); target: class 1 = ``first``, other classes all ``others``."""
    logits = torch.zeros(1, 4, 1, 2)
    target = torch.full((1, 4, 1, 2), others)
    target[0, 0, 0] = torch.tensor(first)
    return logits, target


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bce_by_hand() -> None:
    # BCE(x, y) = y * softplus(-x) + (1 - y) * softplus(x); logits (2, -1) with targets (1, 0)
    logits = torch.tensor([2.0, -1.0]).view(1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    total, parts = build_seg_loss({"name": "bce"})(logits, target)
    expected = (softplus(-2.0) + softplus(-1.0)) / 2  # 0.126928 and 0.313262
    assert total.item() == pytest.approx(expected, abs=1e-6)
    assert parts["bce"].item() == pytest.approx(expected, abs=1e-6)


def test_bce_pos_weight_per_class() -> None:
    # logit 0 everywhere: each pixel costs ln2, positives times their class weight. 8 pixels (4 classes x 2):
    # classes 1..4 each have one positive pixel (weights 2, 2, 1, 1.5) and one negative (weight 1).
    logits = torch.zeros(1, 4, 1, 2)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2).repeat(1, 4, 1, 1)
    total, _ = build_seg_loss({"name": "bce", "pos_weight": [2, 2, 1, 1.5]})(logits, target)
    assert total.item() == pytest.approx(LN2 * (2 + 2 + 1 + 1.5 + 4) / 8, abs=1e-6)


def test_dice_by_hand_and_empty_classes() -> None:
    # probabilities 0.5, 0.5 against class-1 truth (1, 0): 2 * 0.5 / (1 + 1) = 0.5 -> loss 0.5 for class 1;
    # classes 2..4 have no true pixels in the batch -> contribute 0, but count in the mean over 4 classes.
    logits, target = _pair([1.0, 0.0])
    total, _ = build_seg_loss("dice")(logits, target)
    assert total.item() == pytest.approx(0.5 / 4, abs=1e-6)
    # perfect, confident prediction -> ~0
    confident = (target * 2 - 1) * 20
    assert build_seg_loss("dice")(confident, target)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_bce_dice_weights() -> None:
    logits, target = _pair([1.0, 0.0])
    bce = LN2  # every pixel at logit 0, no pos_weight
    dice = 0.5 / 4
    loss = build_seg_loss({"name": "bce_dice", "bce_weight": 0.6, "dice_weight": 0.4})
    total, parts = loss(logits, target)
    assert parts["bce"].item() == pytest.approx(bce, abs=1e-6)
    assert parts["dice"].item() == pytest.approx(dice, abs=1e-6)
    assert total.item() == pytest.approx(0.6 * bce + 0.4 * dice, abs=1e-6)
    # registry default weights: 0.75 / 0.25 (1st place)
    total, _ = build_seg_loss({"name": "bce_dice"})(logits, target)
    assert total.item() == pytest.approx(0.75 * bce + 0.25 * dice, abs=1e-6)


def test_focal_by_hand() -> None:
    # logit 0: p_t = 0.5, BCE = ln2, focal = (1 - 0.5)^2 * ln2 = ln2 / 4 for every pixel
    logits, target = _pair([1.0, 0.0])
    assert build_seg_loss("focal")(logits, target)[0].item() == pytest.approx(LN2 / 4, abs=1e-6)
    # alpha 0.25: positives x 0.25, negatives x 0.75; 1 positive and 7 negatives
    total, _ = build_seg_loss({"name": "focal", "alpha": 0.25})(logits, target)
    assert total.item() == pytest.approx(LN2 / 4 * (0.25 * 1 + 0.75 * 7) / 8, abs=1e-6)


def test_lovasz_by_hand() -> None:
    # one (image, class): logits (0.5, 0.5), labels (1, 0). Hinge errors 1 - s*y: (0.5, 1.5); sorted descending
    # (1.5 [neg], 0.5 [pos]); Lovasz gradient of gt (0, 1): jaccard (1 - 1/2, 1 - 0/2) = (0.5, 1) -> (0.5, 0.5);
    # loss = 0.5 * 1.5 + 0.5 * 0.5 = 1.0
    logits = torch.tensor([0.5, 0.5]).view(1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    assert build_seg_loss("lovasz")(logits, target)[0].item() == pytest.approx(1.0, abs=1e-6)
    # separated by a margin of 1 -> 0
    assert build_seg_loss("lovasz")(torch.tensor([1.0, -1.0]).view(1, 1, 1, 2), target)[
        0
    ].item() == pytest.approx(0.0, abs=1e-6)
    # per (image, class) mean: second class all-negative at logit -2 (errors -1, -1 -> relu 0) -> (1 + 0) / 2
    logits2 = torch.stack([logits[0, 0], torch.full((1, 2), -2.0)])[None]
    target2 = torch.stack([target[0, 0], torch.zeros(1, 2)])[None]
    assert build_seg_loss("lovasz")(logits2, target2)[0].item() == pytest.approx(0.5, abs=1e-6)


def test_cls_loss_by_hand() -> None:
    loss = build_cls_loss({"name": "bce", "pos_weight": [2, 1, 1, 1]})
    value = loss(torch.zeros(2, 4), torch.ones(2, 4))
    assert value.item() == pytest.approx(LN2 * (2 + 1 + 1 + 1) / 4, abs=1e-6)
    assert build_cls_loss()(
        torch.tensor([[3.0, -3.0, 0, 0]]), torch.tensor([[1.0, 0, 1, 0]])
    ).item() == pytest.approx((softplus(-3) + softplus(-3) + LN2 + LN2) / 4, abs=1e-6)


def test_every_registered_loss_backpropagates() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 16, requires_grad=True)
    target = (torch.rand(2, 4, 8, 16) > 0.8).float()
    for name in SEG_LOSSES:
        total, parts = build_seg_loss(name)(logits, target)
        assert set(parts) == set(SEG_LOSSES[name])
        (grad,) = torch.autograd.grad(total, logits)
        assert torch.isfinite(total) and grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "config, message",
    [
        ({"name": "nope"}, "seg_loss name 'nope'"),
        ({"name": "bce", "gamma": 2}, "unknown option 'gamma'"),
        ({"name": "bce", "dice_weight": 0.5}, "has no part 'dice'"),
    ],
)
def test_bad_seg_loss_config(config: dict, message: str) -> None:
    with pytest.raises(SteelError, match=message):
        build_seg_loss(config)


def test_bad_cls_loss_config() -> None:
    with pytest.raises(SteelError, match="only 'bce'"):
        build_cls_loss({"name": "focal"})
    with pytest.raises(SteelError, match="unknown option 'gamma'"):
        build_cls_loss({"gamma": 2})
