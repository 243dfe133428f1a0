"""steel.ensemble, the one inference path: TTA augment/deaugment pairs, resize/pad and back, probabilities (not
logits) resized, fold averaging; validation and OOF compute the same probabilities; one decision rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from steel.ensemble import (
    TTA,
    Member,
    augment,
    deaugment,
    parse_tta,
    predict_batch,
    to_model_size,
    to_native,
)
from steel.errors import SteelError
from steel.module import SteelModule
from steel.postprocess import gating_params, postprocess
from tests._ensemble import TINY_NET, one_torch_thread  # noqa: F401 (autouse fixture)


class ConvNet(nn.Module):
    """A per-pixel net with the TwoHeadNet output contract: mask = 3x3 conv of x (4 channels), label = mean of
    the mask logits. Flip-equivariant when the kernel is symmetric in both axes."""

    def __init__(self, kernel: torch.Tensor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.conv.weight.data.copy_(kernel)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = self.conv(x * 4 - 2)
        return {"mask": mask, "label": mask.mean((-2, -1))}


def _kernel(symmetric: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(4, 1, 3, 3, generator=g)
    if symmetric:  # symmetric under both flips: average over the flip group
        k = (k + k.flip(-1) + k.flip(-2) + k.flip(-1).flip(-2)) / 4
    return k


def test_tta_pairs_round_trip() -> None:
    x = torch.rand(2, 4, 8, 12)
    for name in TTA:
        assert torch.equal(deaugment(augment(x, name), name), x)
    assert not torch.equal(augment(x, "hflip"), x) and not torch.equal(augment(x, "vflip"), x)
    with pytest.raises(ValueError, match="unknown TTA"):
        augment(x, "rot90")
    assert parse_tta("none, hflip") == ["none", "hflip"] and parse_tta(None) == ["none"]
    with pytest.raises(SteelError, match="unknown TTA 'rot'"):
        parse_tta("rot")


@torch.no_grad()
def test_deaugment_of_model_of_augment_on_equivariant_model() -> None:
    """deaugment(model(augment(x))) == model(x) for a flip-equivariant model, so its TTA mean equals no TTA;
    a model that is not equivariant gives a different TTA mean (the test can fail)."""
    x = torch.rand(2, 1, 32, 64)
    eq = ConvNet(_kernel(symmetric=True))
    plain = eq(x)["mask"]
    for name in TTA:
        torch.testing.assert_close(deaugment(eq(augment(x, name))["mask"], name), plain, atol=1e-5, rtol=0)
        assert name == "none" or (eq(augment(x, name))["mask"] - plain).abs().max() > 1e-2  # views differ
    p1, c1 = Member([eq], tta=["none"])(x)
    p3, c3 = Member([eq], tta=["none", "hflip", "vflip"])(x)
    torch.testing.assert_close(p3, p1, atol=1e-6, rtol=0)
    torch.testing.assert_close(c3, c1, atol=1e-6, rtol=0)
    skew = ConvNet(_kernel(symmetric=False))
    q1, _ = Member([skew], tta=["none"])(x)
    q3, _ = Member([skew], tta=["none", "hflip", "vflip"])(x)
    assert (q3 - q1).abs().max() > 1e-3


def test_resize_pad_and_back() -> None:
    x = torch.rand(2, 1, 50, 300)
    padded = to_model_size(x, None)
    assert padded.shape[-2:] == (64, 320) and torch.equal(padded[..., :50, :300], x)
    assert torch.equal(padded[..., 63, :300], x[..., 49, :])  # replicate padding
    assert torch.equal(to_native(padded, 50, 300, None), x)
    y = torch.rand(1, 1, 64, 320)
    assert to_model_size(y, None) is y and to_model_size(y, [64, 320]) is y
    r = to_model_size(x, [32, 160])
    assert r.shape[-2:] == (32, 160) and to_native(r, 50, 300, [32, 160]).shape[-2:] == (50, 300)


@torch.no_grad()
def test_member_resizes_probabilities_and_averages_folds() -> None:
    """Member = mean over folds of (TTA-mean sigmoid at the input size, resized back); probabilities are
    resized, not logits (which would give other values)."""
    x = torch.rand(2, 1, 64, 320)
    nets = [ConvNet(_kernel(symmetric=False)), ConvNet(_kernel(symmetric=True))]
    size = [32, 160]
    probs, cls = Member(nets, size, ["none", "hflip"])(x)
    want_p, want_c = [], []
    for net in nets:
        xin = F.interpolate(x, size=(32, 160), mode="bilinear", align_corners=False)
        o1, o2 = net(xin), net(xin.flip(-1))
        p = (torch.sigmoid(o1["mask"]) + torch.sigmoid(o2["mask"]).flip(-1)) / 2
        want_p.append(F.interpolate(p, size=(64, 320), mode="bilinear", align_corners=False))
        want_c.append((torch.sigmoid(o1["label"]) + torch.sigmoid(o2["label"])) / 2)
    torch.testing.assert_close(probs, (want_p[0] + want_p[1]) / 2, atol=1e-6, rtol=0)
    torch.testing.assert_close(cls, (want_c[0] + want_c[1]) / 2, atol=1e-6, rtol=0)
    xin = F.interpolate(x, size=(32, 160), mode="bilinear", align_corners=False)
    logits_resized = torch.sigmoid(
        F.interpolate(nets[0](xin)["mask"], size=(64, 320), mode="bilinear", align_corners=False)
    )
    p0, _ = Member([nets[0]], size)(x)
    assert (p0 - logits_resized).abs().max() > 1e-4


@torch.no_grad()
@pytest.mark.parametrize("input_size", [None, [64, 352]])
def test_validation_probabilities_are_the_oof_probabilities(input_size) -> None:
    """SteelModule's validation path and the OOF path (predict_batch) give the same probabilities."""
    torch.manual_seed(0)
    model = SteelModule(**TINY_NET, input_size=input_size).eval()
    x = torch.rand(3, 1, 64, 320)
    probs, cls, logits = model.native_outputs(x)
    p, c = predict_batch(model.net, x, input_size)
    torch.testing.assert_close(probs, p, atol=1e-6, rtol=0)
    torch.testing.assert_close(cls, c, atol=1e-6, rtol=0)
    assert logits["mask"].shape == (3, 4, 64, 320) and probs.shape == (3, 4, 64, 320)


@pytest.mark.parametrize("gating", ["none", "hard", "soft"])
def test_validation_decision_is_postprocess(gating: str) -> None:
    """SteelModule.decide (val/dice) == steel.postprocess.postprocess (sweep, export) with gating_params."""
    rng = np.random.default_rng(1)
    probs = rng.random((3, 4, 16, 24), dtype=np.float32)
    cls = rng.random((3, 4), dtype=np.float32)
    model = SteelModule(**TINY_NET, gating=gating, pixel_threshold=0.45, label_threshold=0.4)
    got = model.decide(torch.from_numpy(probs), torch.from_numpy(cls)).numpy()
    rule = gating_params(gating, 0.45, 0.4)
    want = np.stack([postprocess(probs[i], cls[i], rule) for i in range(3)])
    assert np.array_equal(got, want) and want.any() and not want.all()
