"""Prediction throughput: the eager ensemble (``steel predict DIR``) against its TorchScript export
(``steel predict FILE``), measured in the same run on the same uint8 images.

    python benchmarks/bench_predict.py [--n 32] [--height 64] [--width 320] [--batch 8] [--threads N]
    python benchmarks/bench_predict.py --cuda [--large-n 5506] [--measure-n 256] [--arch Unet] [--encoder resnet34]
                                              [--folds 10] [--tta none,hflip,vflip]

CPU (default): random-weight tiny nets (Unet + ``tu-test_resnet.r160_in1k``, encoder depth 3) on random
64x320 images, two ensembles: 1 member x 1 fold, no TTA; 1 member x 10 folds x 3 TTA (none, hflip, vflip).
``--cuda``: ``--measure-n`` images of 256x1600 timed on the GPU and projected to ``--large-n`` (5,506 = the Kaggle
test set), ``--folds`` folds x ``--tta``, a Kaggle-size net (``--arch`` / ``--encoder``, random weights). Images are generated in memory
(decoding JPEGs is not measured). Post-processing is on (label gate 0.5, pixel 0.5, min-area 100, components
< 150 px removed: noise masks from random nets, a hard case for it). The exported module runs the way
``steel predict`` runs it (``torch.jit.optimized_execution(False)``); the profiling executor is also shown.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from steel.blend import Ensemble, Member
from steel.export import quiet_jit, script_ensemble
from steel.model import TwoHeadNet
from steel.postprocess import Params

TINY = {
    "arch": "Unet",
    "encoder": "tu-test_resnet.r160_in1k",
    "arch_kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]},
}


def build(
    folds: int,
    tta: list[str],
    arch: str,
    encoder: str,
    arch_kwargs: dict | None,
    size: tuple[int, int],
    device: str,
):
    """(eager Ensemble, loaded TorchScript export) of ``folds`` random-weight nets."""
    torch.manual_seed(0)
    nets = [TwoHeadNet(arch, encoder, None, 1, 4, 0.0, arch_kwargs=arch_kwargs).eval() for _ in range(folds)]
    params = Params.uniform(label=0.5, pixel=0.5, min_area=100, min_component=150)
    eager = Ensemble([Member(nets, None, tta)], None, params).to(device).eval()
    spec = {"members": [{"input_size": None}], "image_size": list(size)}
    scripted = script_ensemble(eager, spec, params)
    with tempfile.TemporaryDirectory() as tmp, quiet_jit():
        torch.jit.save(scripted, str(Path(tmp) / "m.pt"))
        loaded = torch.jit.load(str(Path(tmp) / "m.pt"), map_location=device)
    return eager, loaded


def rates(
    variants: list[tuple], images: torch.Tensor, batch: int, device: str, repeats: int = 3
) -> list[float]:
    """Best images/s of each (model, optimized_execution) over ``repeats`` passes over ``images`` in batches,
    the variants interleaved pass by pass (so background load hits them alike), after one warm-up batch each."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = [0.0] * len(variants)
    with torch.inference_mode():
        for model, optimized in variants:
            with torch.jit.optimized_execution(optimized):
                model(images[:batch].to(device))
        for _ in range(repeats):
            for i, (model, optimized) in enumerate(variants):
                with torch.jit.optimized_execution(optimized):
                    sync()
                    t = time.perf_counter()
                    for s in range(0, len(images), batch):
                        model(images[s : s + batch].to(device, non_blocking=True))[0].cpu()
                    sync()
                    best[i] = max(best[i], len(images) / (time.perf_counter() - t))
    return best


def cpu(args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n, args.height, args.width), dtype=torch.uint8, generator=g)
    print(f"CPU, torch threads {torch.get_num_threads()}, {args.n} random {args.height}x{args.width} images, batch {args.batch}; "
          f"nets {TINY['arch']}/{TINY['encoder']} depth 3 (random weights)")  # fmt: skip
    print(
        "| ensemble | eager img/s | exported img/s (predict) | exported img/s (profiling executor) | exported / eager |"
    )
    print("|---|---|---|---|---|")
    for name, folds, tta in (
        ("1 member x 1 fold, no TTA", 1, ["none"]),
        ("10 folds x 3 TTA", 10, ["none", "hflip", "vflip"]),
    ):
        eager, exported = build(
            folds, tta, TINY["arch"], TINY["encoder"], TINY["arch_kwargs"], (args.height, args.width), "cpu"
        )
        e, x, xp = rates(
            [(eager, True), (exported, False), (exported, True)], images, args.batch, "cpu", args.repeats
        )
        print(f"| {name} | {e:.1f} | {x:.1f} | {xp:.1f} | {x / e:.2f} |", flush=True)


def large(args: argparse.Namespace) -> None:
    """Kaggle-size nets at 256x1600 on ``--device``: ``--measure-n`` images timed, projected to ``--large-n``."""
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("--cuda: no CUDA device here; nothing measured")
        return
    tta = args.tta.split(",")
    n = min(args.measure_n, args.large_n)
    g = torch.Generator().manual_seed(0)
    h, w = args.large_size
    images = torch.randint(0, 256, (n, h, w), dtype=torch.uint8, generator=g)
    if device.startswith("cuda"):
        images = images.pin_memory()
    t = time.perf_counter()
    eager, exported = build(args.folds, tta, args.arch, args.encoder, None, (h, w), device)
    built = time.perf_counter() - t
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(
        f"{name}: {n} images {h}x{w} timed (projected to {args.large_n}), {args.arch}/{args.encoder} x "
        f"{args.folds} folds x TTA {','.join(tta)} = {args.folds * len(tta)} forward passes an image, "
        f"batch {args.batch}, fp32, post-processing on; build + export {built:.1f} s"
    )
    print("| variant | img/s | projected s for", args.large_n, "images |")
    print("|---|---|---|")
    for label, r in zip(
        ("eager", "exported"),
        rates([(eager, True), (exported, False)], images, args.batch, device, args.repeats),
    ):
        print(f"| {label} | {r:.1f} | {args.large_n / r:.0f} |", flush=True)
    if device.startswith("cuda"):
        print(f"GPU memory peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32, help="CPU: images")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=3, help="CPU: passes per variant (best is reported)")
    p.add_argument("--cuda", action="store_true", help="the 5,506 x 256x1600 measurement on the GPU")
    p.add_argument(
        "--large", action="store_true", help="the 256x1600 measurement on --device (smoke test on cpu)"
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--large-n", type=int, default=5506, help="images the timing is projected to")
    p.add_argument("--measure-n", type=int, default=256, help="images actually timed (--large-size)")
    p.add_argument("--large-size", type=int, nargs=2, default=[256, 1600], metavar=("H", "W"))
    p.add_argument("--arch", default="Unet")
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--tta", default="none,hflip,vflip")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cuda or args.large:
        large(args)
    else:
        cpu(args)


if __name__ == "__main__":
    main()
