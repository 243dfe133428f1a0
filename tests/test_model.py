"""TwoHeadNet: output contract, normalisation inside, grey->RGB repeat, torch.export, resizing helper."""

from __future__ import annotations

import pytest
import torch

from steel.errors import SteelError
from steel.model import ARCHS, TwoHeadNet

TINY_ENC = "tu-test_resnet.r160_in1k"


@pytest.fixture(scope="module")
def net() -> TwoHeadNet:
    torch.manual_seed(0)
    return TwoHeadNet("Unet", TINY_ENC, arch_kwargs={"decoder_channels": [32, 16, 16, 8, 8]}).eval()


@pytest.mark.parametrize("arch", ["Unet", "FPN", "PSPNet", "DeepLabV3Plus", "Linknet"])
def test_output_contract(arch: str) -> None:
    torch.manual_seed(0)
    model = TwoHeadNet(arch, TINY_ENC).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 128))
    assert set(out) == {"mask", "label"}
    assert out["mask"].shape == (2, 4, 64, 128) and out["mask"].dtype == torch.float32
    assert out["label"].shape == (2, 4)


def test_registry_is_flat_and_case_insensitive() -> None:
    assert {"unet", "fpn", "pspnet", "deeplabv3plus", "linknet"} <= set(ARCHS)
    TwoHeadNet("deeplab_v3_plus", TINY_ENC)  # separators ignored
    with pytest.raises(SteelError, match="arch 'UNetX'"):
        TwoHeadNet("UNetX", TINY_ENC)
    with pytest.raises(SteelError, match="encoder 'no-such-encoder'"):
        TwoHeadNet("Unet", "no-such-encoder")


def test_normalisation_inside_and_grey_repeat() -> None:
    torch.manual_seed(0)
    model = TwoHeadNet("FPN", TINY_ENC, in_channels=3).eval()
    assert {"mean", "std"} <= set(dict(model.named_buffers()))  # travels with state_dict / export
    x = torch.rand(1, 1, 64, 128)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        mask, label = model.net((x.repeat(1, 3, 1, 1) - mean) / std)
        out = model(x)
    torch.testing.assert_close(out["mask"], mask)
    torch.testing.assert_close(out["label"], label)
    grey = TwoHeadNet("FPN", TINY_ENC, in_channels=1)
    assert grey.mean.shape == (1, 1, 1, 1) and grey.mean.item() == pytest.approx((0.485 + 0.456 + 0.406) / 3)
    with pytest.raises(SteelError, match="in_channels 2"):
        TwoHeadNet("FPN", TINY_ENC, in_channels=2)


def test_torch_export_matches_eager(net: TwoHeadNet) -> None:
    """The net goes through torch.export (what ``steel export`` uses) with a dynamic batch and gives the eager
    outputs (TorchScript, deprecated in torch, is no longer used anywhere)."""
    from steel.export import exportable

    torch.manual_seed(1)
    x = torch.rand(2, 1, 64, 320)
    batch = torch.export.Dim("batch", min=1, max=8)
    ep = torch.export.export(exportable(net), (x,), dynamic_shapes=({0: batch},))
    run = ep.module()
    with torch.no_grad():
        for inp in (x, torch.rand(3, 1, 64, 320), torch.rand(1, 1, 64, 320)):
            eager, exported = net(inp), run(inp)
            torch.testing.assert_close(exported["mask"], eager["mask"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(exported["label"], eager["label"], rtol=1e-5, atol=1e-5)


def test_mask_prior_sets_initial_probability() -> None:
    model = TwoHeadNet("Unet", TINY_ENC, mask_prior=0.01).eval()
    head = [m for m in model.net.segmentation_head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    assert torch.sigmoid(head.bias).tolist() == pytest.approx([0.01] * 4, rel=1e-4)
    with pytest.raises(SteelError, match="mask_prior"):
        TwoHeadNet("Unet", TINY_ENC, mask_prior=1.5)
