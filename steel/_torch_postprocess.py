"""Batched torch post-processing, identical to ``steel.postprocess.postprocess`` (see there for the rules).

Pure torch and TorchScript-scriptable (``torch.jit.script(postprocess_torch)``); not traceable, since the
component labelling loops until convergence. Import it as ``steel.postprocess.postprocess_torch``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def component_sizes_torch(mask: torch.Tensor) -> torch.Tensor:
    """Size of the 8-connected component of every pixel: mask bool (N, H, W) -> int64 (N, H, W), 0 off the mask.

    Labels start as the pixel's 1-based index and grow to the component maximum by 3x3 max-pooling
    (twice, restricted to the mask) plus pointer jumping (take the label of the pixel the label points
    at, which is in the same component and at least as large), until nothing changes; sizes are then a bincount over per-plane offset labels.
    """
    n, h, w = mask.shape
    hw = h * w
    dtype = torch.float32 if hw < 16777216 else torch.float64  # labels must be exact in the float type
    fm = mask.to(dtype)
    lab = torch.arange(1, hw + 1, dtype=dtype, device=mask.device).view(1, h, w) * fm
    while True:
        new = F.max_pool2d(lab.unsqueeze(1), kernel_size=3, stride=1, padding=1) * fm.unsqueeze(1)
        new = (F.max_pool2d(new, kernel_size=3, stride=1, padding=1).squeeze(1)) * fm
        flat = new.reshape(n, hw)
        new = flat.gather(1, (flat.long() - 1).clamp(min=0)).view(n, h, w) * fm  # >= new: a label's own label
        if torch.equal(new, lab):
            break
        lab = new
    glob = lab.long().reshape(n, hw) + torch.arange(n, device=mask.device).unsqueeze(1) * (hw + 1)
    counts = torch.bincount(glob.reshape(-1), minlength=n * (hw + 1))
    return counts[glob].view(n, h, w) * mask.long()


def postprocess_torch(
    prob: torch.Tensor,
    cls: torch.Tensor,
    label_thr: torch.Tensor,
    pixel_thr: torch.Tensor,
    min_area: torch.Tensor,
    min_component: torch.Tensor,
    soft: bool = False,
    stride: int = 1,
) -> torch.Tensor:
    """Masks bool (B, 4, H, W) from prob (B, 4, H, W) in [0, 1], cls (B, 4) and per-class thresholds (4,).

    ``min_area`` / ``min_component`` are in full-resolution pixels; areas are multiplied by ``stride**2``.
    """
    b, c, h, w = prob.shape
    dev = prob.device
    x = prob * cls.to(prob.dtype).view(b, c, 1, 1) if soft else prob
    mask = x >= pixel_thr.to(device=dev, dtype=prob.dtype).view(1, c, 1, 1)
    s2 = float(stride * stride)
    mc = min_component.to(device=dev, dtype=torch.float64)
    planes = (mc > 0).view(1, c).expand(b, c) & mask.flatten(2).any(2)
    if bool(planes.any()):
        idx = planes.reshape(-1).nonzero().squeeze(1)
        flat = mask.reshape(b * c, h, w)
        sub = flat.index_select(0, idx)
        sizes = component_sizes_torch(sub).to(torch.float64) * s2
        thr = mc.repeat(b).index_select(0, idx).view(-1, 1, 1)
        flat = flat.index_copy(0, idx, sub & (sizes >= thr))
        mask = flat.view(b, c, h, w)
    area = mask.flatten(2).sum(2).to(torch.float64) * s2
    keep = (cls >= label_thr.to(device=dev, dtype=cls.dtype).view(1, c)) & (
        area >= min_area.to(device=dev, dtype=torch.float64).view(1, c)
    )
    return mask & keep.view(b, c, 1, 1)
