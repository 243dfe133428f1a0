"""Post-processing speed on CPU: ``postprocess_torch`` (eager), ``postprocess_static`` (eager and through
``torch.export``, as ``steel export`` runs it) against the previous
iterative torch labelling (copied below as the baseline) and the numpy/cv2 ``postprocess``, same inputs, same run.

    python benchmarks/bench_postprocess.py [--n 8] [--height 256] [--width 1600] [--repeat 3] [--threads 1]
    python benchmarks/bench_postprocess.py --noise   # worst case: every plane uniform noise at density 0.5

Inputs (default): ``--n`` images of synthetic defect masks (``steel.synth``, each image with 1-2 defect
classes) turned into probability maps: the mask blurred (sigma 3) plus smooth noise (sigma 1.5, std ~0.15),
which leaves scattered false-positive specks above the threshold; class probabilities 0.9 for present classes,
uniform [0, 0.6] for absent ones. Thresholds: label 0.5, pixel 0.5, min_component 150 / 150 / 600 / 1000,
min_area 300 / 300 / 1000 / 2000 (component labelling runs on every plane that passes the label gate with
at least min_area pixels).
All implementations must give identical masks (checked). Times are the best of ``--repeat`` runs (the
baseline runs once: it takes long, ~1.5 min for either input).
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from steel.postprocess import ClassParams, Params, postprocess, postprocess_torch
from steel.synth import make_image


def old_component_sizes(mask: torch.Tensor) -> torch.Tensor:
    """Baseline (the previous steel implementation): 3x3 max-pool label propagation until nothing changes."""
    n, h, w = mask.shape
    hw = h * w
    dtype = torch.float32 if hw < 16777216 else torch.float64
    fm = mask.to(dtype)
    lab = torch.arange(1, hw + 1, dtype=dtype, device=mask.device).view(1, h, w) * fm
    while True:
        new = F.max_pool2d(lab.unsqueeze(1), kernel_size=3, stride=1, padding=1) * fm.unsqueeze(1)
        new = (F.max_pool2d(new, kernel_size=3, stride=1, padding=1).squeeze(1)) * fm
        flat = new.reshape(n, hw)
        new = flat.gather(1, (flat.long() - 1).clamp(min=0)).view(n, h, w) * fm
        if torch.equal(new, lab):
            break
        lab = new
    glob = lab.long().reshape(n, hw) + torch.arange(n, device=mask.device).unsqueeze(1) * (hw + 1)
    counts = torch.bincount(glob.reshape(-1), minlength=n * (hw + 1))
    return counts[glob].view(n, h, w) * mask.long()


def old_postprocess_torch(
    prob: torch.Tensor,
    cls: torch.Tensor,
    label_thr: torch.Tensor,
    pixel_thr: torch.Tensor,
    min_area: torch.Tensor,
    min_component: torch.Tensor,
    soft: bool = False,
    stride: int = 1,
) -> torch.Tensor:
    """Baseline: the previous ``postprocess_torch`` (labels every plane with min_component > 0 and a pixel)."""
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
        sizes = old_component_sizes(sub).to(torch.float64) * s2
        thr = mc.repeat(b).index_select(0, idx).view(-1, 1, 1)
        flat = flat.index_copy(0, idx, sub & (sizes >= thr))
        mask = flat.view(b, c, h, w)
    area = mask.flatten(2).sum(2).to(torch.float64) * s2
    keep = (cls >= label_thr.to(device=dev, dtype=cls.dtype).view(1, c)) & (
        area >= min_area.to(device=dev, dtype=torch.float64).view(1, c)
    )
    return mask & keep.view(b, c, 1, 1)


def realistic(n: int, h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probability maps float32 (n, 4, h, w) and class probabilities float32 (n, 4) (see the module doc)."""
    rng = np.random.default_rng(seed)
    prob = np.empty((n, 4, h, w), np.float32)
    cls = rng.uniform(0, 0.6, (n, 4)).astype(np.float32)
    for i in range(n):
        classes = sorted(
            {int(c) for c in rng.choice([1, 2, 3, 4], int(rng.integers(1, 3)), p=[0.2, 0.1, 0.5, 0.2])}
        )
        _, masks = make_image(rng, classes, h, w)
        for c in range(4):
            soft = cv2.GaussianBlur(masks[c].astype(np.float32), (0, 0), 3) * 0.95
            noise = cv2.GaussianBlur(rng.normal(0, 0.8, (h, w)).astype(np.float32), (0, 0), 1.5)
            prob[i, c] = np.clip(soft + 0.1 + noise, 0, 1)
        cls[i, [c - 1 for c in classes]] = 0.9
    return prob, cls


def best_of(fn, repeat: int) -> tuple[float, np.ndarray]:
    """Best wall time (s) of ``repeat`` calls and the last result as a numpy array."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, np.asarray(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch and cv2 threads (1: steady on shared cores)")
    p.add_argument("--noise", action="store_true", help="uniform noise at density 0.5 instead (worst case)")
    p.add_argument("--no-baseline", action="store_true", help="skip the slow iterative baseline")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cv2.setNumThreads(a.threads)
    if a.noise:
        rng = np.random.default_rng(0)
        prob = rng.random((a.n, 4, a.height, a.width), dtype=np.float32)
        cls = np.full((a.n, 4), 0.9, np.float32)
    else:
        prob, cls = realistic(a.n, a.height, a.width)
    params = Params(
        tuple(ClassParams(0.5, 0.5, ma, mc) for ma, mc in zip((300, 300, 1000, 2000), (150, 150, 600, 1000))),
        "hard",
    )
    t_args = {k: torch.from_numpy(v) for k, v in params.arrays().items()}
    tp, tc = torch.from_numpy(prob), torch.from_numpy(cls)
    args = (tp, tc, t_args["label"], t_args["pixel"], t_args["min_area"], t_args["min_component"], False, 1)
    from steel._torch_postprocess import postprocess_static

    class Static(torch.nn.Module):
        def forward(self, p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return postprocess_static(p, c, *args[2:])

    exported = torch.export.export(Static(), (tp, tc)).module()
    mask = prob >= 0.5
    gated = int(((cls >= 0.5)[:, :, None, None] & mask).any((2, 3)).sum())
    print(
        f"{a.n} x 4 x {a.height} x {a.width} {'noise' if a.noise else 'realistic'} maps, "
        f"{mask.mean() * 100:.2f} % of pixels >= 0.5, {gated} planes pass the label gate with pixels set; "
        f"{torch.get_num_threads()} threads"
    )

    rows = []
    t_np, ref = best_of(
        lambda: np.stack([postprocess(prob[i], cls[i], params) for i in range(a.n)]), a.repeat
    )
    rows.append(("numpy/cv2 postprocess (loop over images)", t_np))
    t_eager, out = best_of(lambda: postprocess_torch(*args).numpy(), a.repeat)
    assert np.array_equal(out, ref), "eager postprocess_torch differs from numpy"
    rows.append(("postprocess_torch, eager", t_eager))
    t_static, out = best_of(lambda: postprocess_static(*args).numpy(), a.repeat)
    assert np.array_equal(out, ref), "eager postprocess_static differs from numpy"
    rows.append(("postprocess_static, eager", t_static))
    t_exp, out = best_of(lambda: exported(tp, tc).numpy(), a.repeat)
    assert np.array_equal(out, ref), "exported postprocess_static differs from numpy"
    rows.append(("postprocess_static, torch.export (as steel export)", t_exp))
    if not a.no_baseline:
        t_old, out = best_of(lambda: old_postprocess_torch(*args).numpy(), 1)
        assert np.array_equal(out, ref), "baseline differs from numpy"
        rows.append(("baseline: previous iterative torch labelling (1 run)", t_old))

    print(f"kept pixels: {int(ref.sum())}; all implementations give identical masks")
    print("| implementation | s per batch | ms per image | vs eager |")
    print("|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.3f} | {t / a.n * 1000:.1f} | {t / t_eager:.2f}x |")


if __name__ == "__main__":
    main()
