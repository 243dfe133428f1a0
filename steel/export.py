"""``steel export DIR --out FILE``: a run dir or an ensemble dir (with its thresholds.json) as one file.

TorchScript (default): ``torch.jit.script`` of ``steel.blend.Ensemble`` (the class ``steel predict DIR`` runs
eagerly) whose fold nets are ``torch.jit.trace``-d: uint8 -> [0, 1], RGB -> grey, resizing to each
member's input size and back, flip TTA, blending, gating, thresholds and post-processing
(``steel.postprocess.postprocess_torch``) are all inside. Using it needs torch alone::

    extra = {"manifest.json": ""}
    model = torch.jit.load("ensemble.pt", _extra_files=extra)   # map_location="cuda" for a GPU
    manifest = json.loads(extra["manifest.json"])
    with torch.jit.optimized_execution(False), torch.inference_mode():  # faster: see steel.predict
        masks, cls_probs, mask_probs = model(images)  # uint8 (B, H, W) or (B, H, W, 3) -> bool (B, 4, H, W),
                                                      # float (B, 4), float (B, 4, H, W)

The manifest (thresholds, image/input sizes, channels, members, TTA, mode, weights, package versions) is
``manifest.json`` in the archive's ``extra/`` folder; ``read_manifest`` reads it with zipfile only.

ONNX (``--format onnx``): one fold net of one member (``--member``, ``--fold``), fixed input size
float (B, 1, h, w) in [0, 1] -> (mask probs (B, 4, h, w), class probs (B, 4)); no resizing, TTA or
post-processing inside (the manifest, in the model's metadata_props, says what to apply). The export is
checked against onnxruntime; a max abs difference above ``--tol`` is an error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import warnings
import zipfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steel import KAGGLE_SHAPE, __version__
from steel.errors import SteelError

MANIFEST = "manifest.json"
FORMAT = "steel-ensemble/1"


@contextmanager
def quiet_jit():
    """Silence torch.jit deprecation and tracer warnings (the export is checked numerically instead)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.(jit|onnx).*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings(
            "ignore", message=r".*legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def versions() -> dict[str, str]:
    """Package versions recorded in manifests."""
    import segmentation_models_pytorch as smp
    import timm

    return {"torch": torch.__version__, "steel": __version__, "segmentation_models_pytorch": smp.__version__,
            "timm": timm.__version__, "python": platform.python_version()}  # fmt: skip


def manifest_of(spec: dict[str, Any], thresholds: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest of an ensemble spec (``steel.blend.build_ensemble``) and its thresholds.json content."""
    members = [
        {
            k: m.get(k)
            for k in (
                "run_dir",
                "checkpoints",
                "weight",
                "tta",
                "input_size",
                "in_channels",
                "arch",
                "encoder",
            )
        }
        for m in spec["members"]
    ]
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
        "image_size": spec.get("image_size"),
        "thresholds": thresholds,
        "input": "uint8 (B, H, W) grey or (B, H, W, 3) RGB",
        "usage": "torch.jit.load(f); with torch.jit.optimized_execution(False), torch.inference_mode(): model(images)",
        "outputs": [
            "masks bool (B, 4, H, W)",
            "class probs float32 (B, 4)",
            "mask probs float32 (B, 4, H, W)",
        ],
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an exported file (TorchScript zip or ONNX) without loading the model."""
    path = Path(path)
    if not path.is_file():
        raise SteelError(f"{path}: file not found")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith(f"/extra/{MANIFEST}")), None)
            if name is None:
                raise SteelError(f"{path}: no {MANIFEST} inside (not made by `steel export`)")
            return json.loads(z.read(name))
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - any parse failure means "not ours"
        raise SteelError(f"{path}: neither a TorchScript nor an ONNX file") from None
    props = {p.key: p.value for p in model.metadata_props}
    if MANIFEST not in props:
        raise SteelError(f"{path}: no {MANIFEST} in the ONNX metadata (not made by `steel export`)")
    return json.loads(props[MANIFEST])


def exportable(net: nn.Module) -> nn.Module:
    """Swap memory-efficient swish (a Python autograd Function in smp's efficientnet encoders, which neither
    tracing nor ONNX can record) for the plain one; numerically identical. Returns ``net`` (eval mode)."""
    for mod in net.modules():
        if hasattr(mod, "set_swish"):
            mod.set_swish(memory_efficient=False)
    return net.eval()


def _example_size(member: dict[str, Any], image_size: list[int] | None) -> tuple[int, int]:
    """(h, w) a member's nets see: its input size, else the image size padded to multiples of 32."""
    if member.get("input_size"):
        return int(member["input_size"][0]), int(member["input_size"][1])
    h, w = image_size or KAGGLE_SHAPE
    return -(-int(h) // 32) * 32, -(-int(w) // 32) * 32


def _thresholds(path: Path, required: bool = True) -> tuple[Any, dict[str, Any] | None]:
    from steel.io import read_json
    from steel.postprocess import THRESHOLDS_FILE, Params

    if not required and not (path / THRESHOLDS_FILE).is_file():
        return Params.uniform(), None
    params = Params.load(path)
    return params, read_json(path / THRESHOLDS_FILE)


def script_ensemble(ensemble: nn.Module, spec: dict[str, Any], params: Any) -> torch.jit.ScriptModule:
    """TorchScript of an eager ``Ensemble`` (built with ``params``): the same class, its fold nets traced at
    their input size (``strict=False``, dict outputs), everything else scripted. ``ensemble`` is untouched."""
    from steel.blend import Ensemble, Member

    members = []
    with quiet_jit():
        for m, mem in zip(spec["members"], ensemble.members):
            h, w = _example_size(m, spec.get("image_size"))
            x = torch.rand(1, 1, h, w, device=ensemble.label_thr.device)
            traced = [
                torch.jit.trace(exportable(net), x, strict=False, check_trace=False) for net in mem.nets
            ]
            members.append(Member(traced, mem.input_size, mem.tta, mem.power))
        shell = Ensemble(members, list(ensemble.weights), params).to(ensemble.label_thr.device).eval()
        return torch.jit.script(shell)


@torch.no_grad()
def parity(eager: nn.Module, scripted: nn.Module, images: torch.Tensor) -> tuple[float, float, int]:
    """(max abs diff of mask probs, of class probs, number of differing mask pixels) on uint8 images."""
    with quiet_jit(), torch.jit.optimized_execution(False):
        m1, c1, p1 = eager(images)
        m2, c2, p2 = scripted(images)
    return float((p1 - p2).abs().max()), float((c1 - c2).abs().max()), int((m1 != m2).sum())


def export_torchscript(
    path: str | os.PathLike, out: str | os.PathLike, check: bool = True, tol: float = 1e-4
) -> Path:
    """Write the TorchScript file of a run/ensemble dir (see the module docstring); returns ``out``."""
    from steel.blend import build_ensemble
    from steel.io import atomic_path

    path = Path(path)
    if not path.is_dir():
        raise SteelError(f"{path}: not a directory (expected a run dir or an ensemble dir)")
    params, thresholds = _thresholds(path)
    ensemble, spec = build_ensemble(path, "cpu", params)
    scripted = script_ensemble(ensemble, spec, params)
    manifest = manifest_of(spec, thresholds)
    if check:
        h, w = spec.get("image_size") or KAGGLE_SHAPE
        images = torch.randint(
            0, 256, (2, int(h), int(w)), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
        dp, dc, dm = parity(ensemble, scripted, images)
        manifest["export_check"] = {
            "max_abs_diff_probs": dp,
            "max_abs_diff_cls": dc,
            "mask_pixels_differing": dm,
        }
        print(
            f"export: parity eager vs TorchScript on 2 random {h}x{w} images: max |dp| {dp:.2e}, |dcls| {dc:.2e}, {dm} mask pixels differ"
        )
        if max(dp, dc) > tol:
            raise SteelError(
                f"TorchScript export differs from the eager ensemble by {max(dp, dc):.2e} > {tol:g}; not written"
            )
    with quiet_jit(), atomic_path(out, ".pt") as tmp:
        torch.jit.save(scripted, str(tmp), _extra_files={MANIFEST: json.dumps(manifest, indent=1)})
    size = Path(out).stat().st_size / 2**20
    print(f"export: {manifest['n_models']} fold models of {len(spec['members'])} member(s), TTA {manifest['tta']}, "
          f"mode {spec['mode']} -> {out} ({size:.1f} MiB, TorchScript)")  # fmt: skip
    return Path(out)


class ProbNet(nn.Module):
    """A fold net with sigmoids: x (B, 1, h, w) in [0, 1] -> (mask probs (B, 4, h, w), class probs (B, 4))."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x)
        return torch.sigmoid(out["mask"]), torch.sigmoid(out["label"])


def export_onnx(
    path: str | os.PathLike, out: str | os.PathLike, member: int = 0, fold: int = 0, tol: float = 1e-4
) -> tuple[Path, float]:
    """Write one fold net of one member as ONNX (fixed input size, dynamic batch); returns (out, max abs diff
    of onnxruntime vs torch). SteelError if smp/torch cannot export it or the parity check fails."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from steel.blend import ensemble_spec
    from steel.io import atomic_path
    from steel.module import load_model

    path = Path(path)
    spec = ensemble_spec(path)
    if not 0 <= member < len(spec["members"]):
        raise SteelError(f"--member {member}: {path} has members 0..{len(spec['members']) - 1}")
    m = spec["members"][member]
    if not 0 <= fold < len(m["checkpoints"]):
        raise SteelError(f"--fold {fold}: member {member} has folds 0..{len(m['checkpoints']) - 1}")
    model = load_model(m["checkpoints"][fold])
    m.update(input_size=list(model.input_size) if model.input_size else None, in_channels=int(model.hparams.get("in_channels", 1)),
             arch=str(model.hparams.get("arch")), encoder=str(model.hparams.get("encoder")))  # fmt: skip
    h, w = _example_size(m, spec.get("image_size"))
    net = ProbNet(exportable(model.net)).eval()
    _, thresholds = _thresholds(path, required=False)
    manifest = manifest_of(
        {**spec, "members": [{**m, "checkpoints": [m["checkpoints"][fold]], "weight": 1.0}]}, thresholds
    )
    manifest.update(format="steel-onnx/1", onnx_input=[1, h, w], inside="one fold net + sigmoid; no resize, TTA, blending or post-processing",
                    input="float32 (B, 1, h, w) in [0, 1] (grey / 255) at onnx_input size", outputs=["mask probs (B, 4, h, w)", "class probs (B, 4)"])  # fmt: skip
    x = torch.rand(2, 1, h, w, generator=torch.Generator().manual_seed(0))
    with atomic_path(out, ".onnx") as tmp:
        try:
            with quiet_jit():
                torch.onnx.export(net, (x,), str(tmp), dynamo=False, input_names=["image"], output_names=["mask_prob", "label_prob"],
                                  dynamic_axes={"image": {0: "batch"}, "mask_prob": {0: "batch"}, "label_prob": {0: "batch"}}, opset_version=17)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - any exporter failure is reported as one line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SteelError(
                f"ONNX export of {m['arch']}/{m['encoder']} failed ({type(e).__name__}: {msg}); use --format torchscript"
            ) from None
        onnx_model = onnx.load(str(tmp))
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = MANIFEST, json.dumps(manifest, indent=1)
        onnx.save(onnx_model, str(tmp))
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"image": x.numpy()})
        with torch.no_grad():
            want = net(x)
        diff = max(float(np.abs(g - t.numpy()).max()) for g, t in zip(got, want))
        print(
            f"export: onnxruntime vs torch on 2 random {h}x{w} inputs: max abs diff {diff:.2e} (tol {tol:g})"
        )
        if not diff <= tol:
            raise SteelError(
                f"ONNX parity check failed: onnxruntime differs from torch by {diff:.2e} > {tol:g}; not written"
            )
    print(
        f"export: member {member} fold {fold} ({m['arch']}/{m['encoder']}, input 1x{h}x{w}) -> {out} (ONNX)"
    )
    return Path(out), diff


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "dir",
        metavar="DIR",
        help="run dir (fold-K/best.ckpt + thresholds.json) or ensemble dir (ensemble.yaml + thresholds.json)",
    )
    p.add_argument("--out", required=True, help="file to write (.pt for TorchScript, .onnx for ONNX)")
    p.add_argument(
        "--format",
        choices=("torchscript", "onnx"),
        default=None,
        help="default: onnx if --out ends in .onnx, else torchscript",
    )
    p.add_argument("--member", type=int, default=0, help="ONNX: which member (default 0)")
    p.add_argument("--fold", type=int, default=0, help="ONNX: which fold net of the member (default 0)")
    p.add_argument(
        "--no-check", action="store_true", help="TorchScript: skip the eager-vs-exported parity check"
    )
    p.add_argument(
        "--tol",
        type=float,
        default=1e-4,
        help="max abs difference of probabilities allowed by the parity checks",
    )


def main(args: argparse.Namespace) -> int:
    fmt = args.format or ("onnx" if str(args.out).lower().endswith(".onnx") else "torchscript")
    if fmt == "onnx":
        export_onnx(args.dir, args.out, args.member, args.fold, args.tol)
    else:
        export_torchscript(args.dir, args.out, check=not args.no_check, tol=args.tol)
    return 0
