"""``steel export DIR --out FILE``: a run dir or an ensemble dir (with its thresholds.json) as one file.

The whole ensemble is one program: uint8 grey images (B, H, W) -> grey / 255, per member resize (or pad) to
its input size, every fold net on every flip TTA view, flips undone, probabilities resized back, fold and
member blending (mean / temperature, weights), then the tuned decision rule (label gate, pixel threshold,
soft gating, small-component removal, min-area; ``steel._torch_postprocess.postprocess_static``, bit-identical
to ``steel.postprocess``) -> (masks bool (B, 4, H, W), class probs float32 (B, 4), mask probs float32
(B, 4, H, W)). Any batch size from 1 to MAX_BATCH; H x W is the run's image size (``manifest["image_size"]``).

Formats (``--format``, ``--compile``):
  * ``pt2`` (default): ``torch.export`` archive, the manifest as its extra file ``manifest.json``. Runs with
    torch alone: ``torch.export.load(path).module()(images)`` (CPU; ``torch.export.passes.move_to_device_pass``
    moves it to a GPU).
  * ``--compile cpu|cuda``: the same program compiled ahead of time by AOTInductor into a ``.pt2`` package
    (``torch._inductor.aoti_load_package(path)(images)``), for that device only; the manifest is added to it.
  * ``onnx``: the same program through the dynamo ONNX exporter (``torch.onnx.export(..., dynamo=True)``),
    post-processing included (the component loops are ONNX ``Loop`` nodes); the manifest is in the model's
    ``metadata_props``. Run it with onnxruntime: inputs {"images": uint8 (B, H, W)}.

Every export is checked against the eager ensemble on random images before it is written (``--no-check``
skips it; ``--tol`` bounds the probability difference). The manifest holds thresholds, image / input sizes,
members and their checkpoints, TTA, mode, weights, package versions and the check's result.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steel import KAGGLE_SHAPE, __version__
from steel.errors import SteelError

MANIFEST = "manifest.json"
FORMAT = "steel-ensemble/2"
MAX_BATCH = 1024  # batch sizes an export accepts: 1 .. MAX_BATCH (a bound keeps AOTInductor's size arithmetic in int64)
OUTPUTS = ["masks bool (B, 4, H, W)", "class probs float32 (B, 4)", "mask probs float32 (B, 4, H, W)"]
USAGE = {
    "pt2": "torch.export.load(path).module()(images)",
    "aoti": "torch._inductor.aoti_load_package(path)(images)",
    "onnx": 'onnxruntime.InferenceSession(path).run(None, {"images": images})',
}


def versions() -> dict[str, str]:
    """Package versions recorded in manifests."""
    import segmentation_models_pytorch as smp
    import timm

    return {"torch": torch.__version__, "steel": __version__, "segmentation_models_pytorch": smp.__version__,
            "timm": timm.__version__, "python": platform.python_version()}  # fmt: skip


def manifest_of(spec: dict[str, Any], thresholds: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest of an ensemble spec (``steel.blend.build_ensemble``) and its thresholds.json content."""
    keys = ("run_dir", "checkpoints", "weight", "tta", "input_size", "in_channels", "arch", "encoder")
    members = [{k: m.get(k) for k in keys} for m in spec["members"]]
    return {
        "format": FORMAT,
        "kind": spec["kind"],
        "source": spec["source"],
        "members": members,
        "n_models": sum(len(m["checkpoints"]) for m in members),
        "mode": spec["mode"],
        "temperature": spec["temperature"],
        "weights": [m["weight"] for m in members],
        "tta": [m["tta"] for m in members],
        "input_size": [m["input_size"] for m in members],
        "channels": [m["in_channels"] for m in members],
        "image_size": list(spec.get("image_size") or KAGGLE_SHAPE),
        "thresholds": thresholds,
        "input": "uint8 (B, H, W) grey, H x W = image_size",
        "outputs": OUTPUTS,
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an exported file (.pt2 archive or package, ONNX) without loading the model; SteelError
    (one line) for a file that is not one, naming old TorchScript exports."""
    path = Path(path)
    if not path.is_file():
        raise SteelError(f"{path}: not found (expected a file from `steel export` or a run/ensemble dir)")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            name = next((n for n in names if n.endswith(f"/extra/{MANIFEST}")), None)
            if any(
                n.endswith(("/constants.pkl", "/code/__torch__.py")) or "/code/__torch__/" in n for n in names
            ):
                raise SteelError(
                    f"{path}: a TorchScript file (older `steel export`); TorchScript is no longer supported: "
                    "re-export with `steel export DIR --out FILE.pt2`"
                )
            if name is None:
                raise SteelError(f"{path}: no {MANIFEST} inside (not made by `steel export`)")
            man = json.loads(z.read(name))
    else:
        try:
            import onnx

            model = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001 - any parse failure means "not ours"
            raise SteelError(f"{path}: not a file from `steel export` (.pt2 archive or ONNX)") from None
        props = {p.key: p.value for p in model.metadata_props}
        if MANIFEST not in props:
            raise SteelError(f"{path}: no {MANIFEST} in the ONNX metadata (not made by `steel export`)")
        man = json.loads(props[MANIFEST])
    if man.get("format") != FORMAT:
        raise SteelError(
            f"{path}: made by an older `steel export` ({man.get('format')}); re-export with `steel export DIR --out FILE.pt2`"
        )
    return man


def exportable(net: nn.Module) -> nn.Module:
    """Swap memory-efficient swish (a Python autograd Function in smp's efficientnet encoders, which the
    exporters cannot record) for the plain one; numerically identical. Returns ``net`` (eval mode)."""
    for mod in net.modules():
        if hasattr(mod, "set_swish"):
            mod.set_swish(memory_efficient=False)
    return net.eval()


class Program(nn.Module):
    """What is exported: an ``Ensemble``'s forward with the static-shape post-processing.

    forward(images uint8 (B, H, W)) -> (masks bool (B, 4, H, W), class probs (B, 4), mask probs (B, 4, H, W)),
    equal to ``ensemble(images)`` (the same ``to_input`` and ``probs``; ``postprocess_static`` is bit-identical
    to the ``postprocess_torch`` the ensemble calls).
    """

    def __init__(self, ensemble: nn.Module, compact: bool = True) -> None:
        super().__init__()
        self.ensemble = ensemble
        self.compact = compact
        for member in ensemble.members:
            for net in member.nets:
                exportable(net)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from steel._torch_postprocess import postprocess_static

        e = self.ensemble
        probs, cls = e.probs(e.to_input(images))
        masks = postprocess_static(
            probs,
            cls,
            e.label_thr,
            e.pixel_thr,
            e.min_area,
            e.min_component,
            e.soft,
            1,
            self.compact,
            e.scale_thr,
        )
        return masks, cls, probs


def export_program(
    ensemble: nn.Module, image_size: tuple[int, int] | list[int]
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``Program(ensemble)`` for uint8 images (B, H, W), B free (on the ensemble's device).

    The component labelling is traced with data-dependent sizes (``compact``); a torch whose exporter cannot
    do that inside ``while_loop`` gets the fixed-shape labelling instead (same masks, more work)."""
    h, w = int(image_size[0]), int(image_size[1])
    device = ensemble.label_thr.device
    x = torch.randint(0, 256, (2, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(
        device
    )
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    failure = ""
    for compact in (True, False):
        try:
            with torch.no_grad():
                return torch.export.export(
                    Program(ensemble, compact).eval(), (x,), dynamic_shapes=({0: batch},)
                )
        except Exception as e:  # noqa: BLE001 - an exporter failure is reported as one line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            failure = f"{type(e).__name__}: {msg[:200]}"
    raise SteelError(f"torch.export of the ensemble failed ({failure})")


class OnnxProgram:
    """An exported ONNX ensemble as a callable: uint8 images (B, H, W) tensor -> the three torch outputs."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu") -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.device = device

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.session.run(None, {"images": images.cpu().numpy()})
        return tuple(torch.from_numpy(o).to(self.device) for o in out)


def _open(path: Path, artifact: str, device: str, exported_on: str = "cpu") -> Any:
    """The callable of an exported file of kind ``artifact`` (pt2, aoti, onnx) on ``device``."""
    if artifact == "pt2":
        ep = torch.export.load(str(path))
        if torch.device(device).type != torch.device(exported_on).type:
            ep = torch.export.passes.move_to_device_pass(ep, device)
        return ep.module()
    if artifact == "aoti":
        if torch.device(device).type != torch.device(exported_on).type:
            raise SteelError(
                f"{path}: compiled for {exported_on} (`steel export --compile {exported_on}`); cannot run on {device}"
            )
        return torch._inductor.aoti_load_package(str(path))
    if artifact == "onnx":
        return OnnxProgram(path, device)
    raise SteelError(f"{path}: unknown artifact {artifact!r} in its manifest (newer `steel export`?)")


def load_exported(path: str | os.PathLike, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """(callable uint8 images (B, H, W) -> (masks, class probs, mask probs), manifest) of a file from
    ``steel export``; needs torch (and onnxruntime for ONNX) only. SteelError for other files."""
    path = Path(path)
    man = read_manifest(path)
    try:
        return _open(path, man.get("artifact"), device, man.get("device", "cpu")), man
    except SteelError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file is reported as one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SteelError(
            f"{path}: cannot load the exported ensemble ({type(e).__name__}: {msg[:160]})"
        ) from None


@torch.no_grad()
def parity(eager: nn.Module, exported: Any, images: torch.Tensor) -> dict[str, float]:
    """Differences between the eager ensemble and an exported one on uint8 images (B, H, W): max abs diff of
    mask probs and of class probs, and the number of mask pixels that differ."""
    m1, c1, p1 = eager(images)
    m2, c2, p2 = exported(images)
    return {
        "max_abs_diff_probs": float((p1 - p2.to(p1.device)).abs().max()),
        "max_abs_diff_cls": float((c1 - c2.to(c1.device)).abs().max()),
        "mask_pixels_differing": int((m1 != m2.to(m1.device)).sum()),
    }


def write_program(
    ep: torch.export.ExportedProgram, out: str | os.PathLike, manifest: dict[str, Any], fmt: str = "pt2",
    compile: str | None = None, eager: nn.Module | None = None, tol: float = 1e-4,
) -> Path:  # fmt: skip
    """Write an exported program as ``fmt`` (pt2, onnx; pt2 + ``compile`` cpu|cuda: AOTInductor package)
    with ``manifest`` inside, atomically (``steel.io.atomic_path``, which first removes the temp file of an
    interrupted earlier write of ``out``). With ``eager``, the written file is loaded back and compared with
    it on 2 random images (``manifest["export_check"]``) before it is renamed into place; a probability
    difference above ``tol`` is a SteelError and nothing is written."""
    from steel.io import atomic_path

    out = Path(out)
    artifact = "aoti" if compile else fmt
    manifest = {**manifest, "artifact": artifact, "usage": USAGE[artifact]}
    if compile:
        manifest["device"] = compile
    device = manifest.get("device", "cpu")
    with atomic_path(out, out.suffix or ".tmp") as tmp:
        if fmt == "onnx":
            _write_onnx(ep, tmp)
        elif compile:
            torch._inductor.aoti_compile_and_package(_fresh(ep), package_path=str(tmp))
        else:
            torch.export.save(ep, str(tmp))
        if eager is not None:
            h, w = manifest.get("image_size") or KAGGLE_SHAPE
            g = torch.Generator().manual_seed(0)
            images = torch.randint(0, 256, (2, int(h), int(w)), dtype=torch.uint8, generator=g).to(device)
            diff = parity(eager, _open(tmp, artifact, device, device), images)
            manifest["export_check"] = diff
            name = {"pt2": "torch.export", "aoti": f"AOTInductor ({compile})", "onnx": "ONNX"}[artifact]
            print(f"export: parity eager vs {name} on 2 random {h}x{w} images: max |dp| {diff['max_abs_diff_probs']:.2e}, "
                  f"|dcls| {diff['max_abs_diff_cls']:.2e}, {diff['mask_pixels_differing']} mask pixels differ")  # fmt: skip
            worst = max(diff["max_abs_diff_probs"], diff["max_abs_diff_cls"])
            if not worst <= tol:
                raise SteelError(
                    f"{name} export differs from the eager ensemble by {worst:.2e} > {tol:g}; not written"
                )
        _add_manifest(tmp, artifact, json.dumps(manifest, indent=1))
    return out


def _add_manifest(path: Path, artifact: str, text: str) -> None:
    """Put the manifest into a written file: ``<archive>/extra/manifest.json`` of a .pt2 zip (where
    ``torch.export.load(..., extra_files=...)`` reads it), ``metadata_props`` of an ONNX model."""
    if artifact == "onnx":
        import onnx

        model = onnx.load(str(path))
        entry = model.metadata_props.add()
        entry.key, entry.value = MANIFEST, text
        onnx.save(model, str(path))
        return
    with zipfile.ZipFile(path) as z:
        root = z.namelist()[0].split("/")[0]
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(f"{root}/extra/{MANIFEST}", text)


def _fresh(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """A copy of ``ep`` through save/load: lowering a program whose ``while_loop``s carry data-dependent sizes
    leaves state behind (torch 2.14: a second ONNX conversion of the same program fails on "pending unbacked
    symbols"; ``copy.deepcopy`` keeps that state), so every lowering gets its own copy."""
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    return torch.export.load(buf)


def _write_onnx(ep: torch.export.ExportedProgram, path: Path) -> None:
    try:
        program = torch.onnx.export(
            _fresh(ep), dynamo=True, input_names=["images"], output_names=["masks", "cls_probs", "mask_probs"],
            verbose=False,
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - an exporter failure is reported as one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SteelError(f"ONNX export failed ({type(e).__name__}: {msg[:200]}); use --format pt2") from None
    program.save(str(path))


def export(
    path: str | os.PathLike, out: str | os.PathLike, fmt: str = "pt2", compile: str | None = None,
    check: bool = True, tol: float = 1e-4,
) -> Path:  # fmt: skip
    """Export a run/ensemble dir to ``out`` (see the module docstring); returns ``out``."""
    from steel.blend import build_ensemble
    from steel.io import read_json
    from steel.postprocess import THRESHOLDS_FILE, Params

    path, out = Path(path), Path(out)
    if fmt not in ("pt2", "onnx"):
        raise SteelError(f"--format {fmt}: choose pt2 or onnx")
    if compile and fmt != "pt2":
        raise SteelError(f"--compile {compile}: AOTInductor packages are .pt2; drop --format {fmt}")
    if compile not in (None, "cpu", "cuda"):
        raise SteelError(f"--compile {compile}: choose cpu or cuda")
    if fmt == "pt2" and out.suffix != ".pt2":
        raise SteelError(f"--out {out}: a torch.export archive is named *.pt2 (or use --format onnx)")
    if compile == "cuda" and not torch.cuda.is_available():
        raise SteelError("--compile cuda: no CUDA device available")
    if not path.is_dir():
        raise SteelError(f"{path}: not a directory (expected a run dir or an ensemble dir)")
    params = Params.load(path)
    device = "cuda" if compile == "cuda" else "cpu"
    ensemble, spec = build_ensemble(path, device, params)
    manifest = {**manifest_of(spec, read_json(path / THRESHOLDS_FILE)), "device": device}
    h, w = manifest["image_size"]
    ep = export_program(ensemble, (h, w))
    compact = any(n.target is torch.ops.aten.nonzero.default for n in ep.graph.nodes)
    manifest["labelling"] = "data-dependent sizes + while_loop" if compact else "fixed shapes + while_loop"
    write_program(ep, out, manifest, fmt, compile, ensemble if check else None, tol)
    name = {"pt2": "torch.export", "onnx": "ONNX"}[fmt] if not compile else f"AOTInductor ({compile})"
    size = out.stat().st_size / 2**20
    print(f"export: {manifest['n_models']} fold models of {len(spec['members'])} member(s), TTA {manifest['tta']}, "
          f"mode {spec['mode']}, images {h}x{w} -> {out} ({size:.1f} MiB, {name})")  # fmt: skip
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "dir",
        metavar="DIR",
        help="run dir (fold-K/best.ckpt + thresholds.json) or ensemble dir (ensemble.yaml + thresholds.json)",
    )
    p.add_argument("--out", required=True, help="file to write (FILE.pt2, or FILE.onnx with --format onnx)")
    p.add_argument(
        "--format",
        choices=("pt2", "onnx"),
        default=None,
        help="default: onnx if --out ends in .onnx, else pt2",
    )
    p.add_argument(
        "--compile",
        choices=("cpu", "cuda"),
        default=None,
        help="pt2: compile ahead of time with AOTInductor for this device (runs there only)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the eager-vs-exported parity check")
    p.add_argument(
        "--tol", type=float, default=1e-4, help="max abs difference of probabilities allowed by the check"
    )


def main(args: argparse.Namespace) -> int:
    fmt = args.format or ("onnx" if str(args.out).lower().endswith(".onnx") else "pt2")
    export(args.dir, args.out, fmt, args.compile, check=not args.no_check, tol=args.tol)
    from steel import tracking  # W&B lineage: thresholds.json and checkpoints -> the exported file

    tracking.log_export(args.dir, args.out)
    return 0
