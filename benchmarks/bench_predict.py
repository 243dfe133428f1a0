"""Prediction throughput: the eager ensemble (``steel predict DIR``) against its exports (``steel predict FILE``):
torch.export .pt2, AOTInductor package, ONNX on onnxruntime; measured in the same run on the same uint8 images.

    python benchmarks/bench_predict.py [--n 32] [--height 64] [--width 320] [--batch 8] [--threads N]
                                       [--variants eager,pt2,aoti,onnx] [--ensembles 1,10x3]
    python benchmarks/bench_predict.py --cuda [--large-n 5506] [--measure-n 256] [--arch Unet] [--encoder resnet34]
                                              [--folds 10] [--tta none,hflip,vflip] [--variants eager,pt2,aoti]

CPU (default): random-weight tiny nets (Unet + ``tu-test_resnet.r160_in1k``, encoder depth 3) on random
64x320 images, two ensembles: 1 member x 1 fold, no TTA; 1 member x 10 folds x 3 TTA (none, hflip, vflip).
``--cuda``: ``--measure-n`` images of 256x1600 timed on the GPU and projected to ``--large-n`` (5,506 = the Kaggle
test set), ``--folds`` folds x ``--tta``, a Kaggle-size net (``--arch`` / ``--encoder``, random weights). Images are generated in memory
(decoding JPEGs is not measured). Post-processing is on (label gate 0.5, pixel 0.5, min-area 100, components
< 150 px removed: noise masks from random nets, a hard case for it). Every export is written to a file and
loaded back as ``steel predict FILE`` loads it (``steel.export.load_exported``); the time to export (and to
compile, for AOTInductor) is printed beside each rate. Rows: eager, exported (.pt2), AOTInductor, onnxruntime.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from steel.ensemble import Ensemble, Member
from steel.export import export_program, load_exported, write_program
from steel.model import TwoHeadNet
from steel.postprocess import Params

TINY = {
    "arch": "Unet",
    "encoder": "tu-test_resnet.r160_in1k",
    "arch_kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]},
}
LABELS = {"eager": "eager", "pt2": "exported", "aoti": "AOTInductor", "onnx": "onnxruntime"}


def build(
    folds: int,
    tta: list[str],
    arch: str,
    encoder: str,
    arch_kwargs: dict | None,
    size: tuple[int, int],
    device: str,
    variants: list[str],
    tmp: Path,
) -> list[tuple[str, object, float]]:
    """[(variant, callable uint8 images -> outputs, seconds to export + write + load)] of ``folds``
    random-weight nets, for the ``variants`` asked (eager, pt2, aoti, onnx)."""
    torch.manual_seed(0)
    nets = [TwoHeadNet(arch, encoder, None, 1, 4, 0.0, arch_kwargs=arch_kwargs).eval() for _ in range(folds)]
    params = Params.uniform(label=0.5, pixel=0.5, min_area=100, min_component=150)
    eager = Ensemble([Member(nets, None, tta)], None, params).to(device).eval()
    out: list[tuple[str, object, float]] = [("eager", eager, 0.0)] if "eager" in variants else []
    exported = [v for v in variants if v != "eager"]
    if not exported:
        return out
    t = time.perf_counter()
    ep = export_program(eager, size)
    t_export = time.perf_counter() - t
    manifest = {"format": "steel-ensemble/2", "image_size": list(size), "device": device}
    for v in exported:
        t = time.perf_counter()
        name = tmp / f"{folds}-{v}.{'onnx' if v == 'onnx' else 'pt2'}"
        compile_for = torch.device(device).type if v == "aoti" else None
        path = write_program(ep, name, manifest, "onnx" if v == "onnx" else "pt2", compile_for)
        model, _ = load_exported(path, device)
        out.append((v, model, t_export + time.perf_counter() - t))
    return out


def rates(
    variants: list[tuple], images: torch.Tensor, batch: int, device: str, repeats: int = 3
) -> list[float]:
    """Best images/s of each model over ``repeats`` passes over ``images`` in batches, the variants interleaved
    pass by pass (so background load hits them alike), after one warm-up batch each."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = [0.0] * len(variants)
    with torch.inference_mode():
        for model in variants:
            model(images[:batch].to(device))
        for _ in range(repeats):
            for i, model in enumerate(variants):
                sync()
                t = time.perf_counter()
                for s in range(0, len(images), batch):
                    model(images[s : s + batch].to(device, non_blocking=True))[0].cpu()
                sync()
                best[i] = max(best[i], len(images) / (time.perf_counter() - t))
    return best


def cpu(args: argparse.Namespace) -> None:
    variants = args.variants.split(",") if args.variants else ["eager", "pt2", "aoti", "onnx"]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n, args.height, args.width), dtype=torch.uint8, generator=g)
    print(f"CPU, torch threads {torch.get_num_threads()}, {args.n} random {args.height}x{args.width} images, batch {args.batch}; "
          f"nets {TINY['arch']}/{TINY['encoder']} depth 3 (random weights)")  # fmt: skip
    print("| ensemble | variant | img/s | / eager | export + load s |")
    print("|---|---|---|---|---|")
    ensembles = {
        "1": ("1 member x 1 fold, no TTA", 1, ["none"]),
        "10x3": ("10 folds x 3 TTA", 10, ["none", "hflip", "vflip"]),
    }
    for name, folds, tta in (ensembles[e] for e in args.ensembles.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            built = build(folds, tta, TINY["arch"], TINY["encoder"], TINY["arch_kwargs"], (args.height, args.width),
                          "cpu", variants, Path(tmp))  # fmt: skip
            r = rates([m for _, m, _ in built], images, args.batch, "cpu", args.repeats)
        base = r[0] if built[0][0] == "eager" else float("nan")
        for (v, _, secs), ips in zip(built, r):
            print(f"| {name} | {LABELS[v]} | {ips:.1f} | {ips / base:.2f} | {secs:.0f} |", flush=True)


def large(args: argparse.Namespace) -> None:
    """Kaggle-size nets at 256x1600 on ``--device``: ``--measure-n`` images timed, projected to ``--large-n``."""
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("--cuda: no CUDA device here; nothing measured")
        return
    default = "eager,pt2,aoti" if device.startswith("cuda") else "eager,pt2"
    variants = (args.variants or default).split(",")
    tta = args.tta.split(",")
    n = min(args.measure_n, args.large_n)
    g = torch.Generator().manual_seed(0)
    h, w = args.large_size
    images = torch.randint(0, 256, (n, h, w), dtype=torch.uint8, generator=g)
    if device.startswith("cuda"):
        images = images.pin_memory()
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(
        f"{name}: {n} images {h}x{w} timed (projected to {args.large_n}), {args.arch}/{args.encoder} x "
        f"{args.folds} folds x TTA {','.join(tta)} = {args.folds * len(tta)} forward passes an image, "
        f"batch {args.batch}, fp32, post-processing on"
    )
    if "aoti" in variants:
        print(
            f"(AOTInductor compiles each of the {args.folds * len(tta)} net calls: minutes; its row comes last)"
        )
    print("| variant | img/s | projected s for", args.large_n, "images | export + load s |")
    print("|---|---|---|---|", flush=True)
    # one variant at a time, each row printed as soon as it is known (an AOTInductor compile may be cut off)
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            built = build(args.folds, tta, args.arch, args.encoder, None, (h, w), device, [v], Path(tmp))
            ((_, model, secs),) = built
            (ips,) = rates([model], images, args.batch, device, args.repeats)
            print(f"| {LABELS[v]} | {ips:.1f} | {args.large_n / ips:.0f} | {secs:.0f} |", flush=True)
            del built, model
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
    p.add_argument("--ensembles", default="1,10x3", help="CPU: which ensembles (1, 10x3)")
    p.add_argument(
        "--variants",
        default=None,
        help="comma list of eager, pt2, aoti, onnx (default: CPU all four; --cuda eager,pt2,aoti; --large on cpu eager,pt2)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cuda or args.large:
        large(args)
    else:
        cpu(args)


if __name__ == "__main__":
    main()
