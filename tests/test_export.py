"""steel export: the whole ensemble as one torch.export .pt2 (runs with torch alone), an AOTInductor package and
ONNX (onnxruntime), each equal to the eager ensemble; the static-shape post-processing they hold equals numpy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from steel import rle
from steel._torch_postprocess import component_sizes_static, postprocess_static
from steel.blend import build_ensemble
from steel.ensemble import Ensemble, Member
from steel.errors import SteelError
from steel.export import MANIFEST, export, export_program, load_exported, read_manifest, write_program
from steel.labels import list_images, read_submission
from steel.model import TwoHeadNet
from steel.postprocess import ClassParams, Params, postprocess
from tests._ensemble import (  # noqa: F401 (autouse fixture)
    ONE_THREAD_ENV,
    exported_ensemble,
    one_torch_thread,
    small_exported,
    tiny_runs,
    write_thresholds,
)
from tests.conftest import steel_in_process
from tests.test_postprocess import hard_planes, opencv_sizes

ENCODER = "tu-test_resnet.r160_in1k"
ARCHS = {
    "Unet": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]},
    "FPN": {"encoder_depth": 3, "decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32},
    "PSPNet": {"encoder_depth": 3, "psp_out_channels": 16},
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synth_dir, folds_csv):
    """(blend of two 3-fold runs with scaled-mode thresholds: 6 nets; its .pt2)."""
    return exported_ensemble(tmp_path_factory, synth_dir, folds_csv)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(one-net ensemble dir, scaled-mode thresholds; its .pt2): for what does not depend on the nets."""
    return small_exported(tmp_path_factory)


def tiny_ensemble(
    arch: str, size: tuple[int, int], seed: int = 0, full: bool = True, n: int = 3, resize: bool = True,
    tta: tuple[str, ...] = ("none", "hflip"),
) -> Ensemble:  # fmt: skip
    """Random tiny ``arch`` nets; ``full``: two members (native size + hflip TTA; 2 folds at a resized input
    seen vflipped only + temperature 2; weights 1:2), else one net at a resized input with ``tta``. Thresholds
    lie between the quantiles of their own probabilities on ``_images(n, size)`` (the images the tests compare
    on), so masks are neither empty nor full, and component removal and min-area are on. Each net and view
    is a copy of the net in the program: about a second more to export and to convert to ONNX."""
    torch.manual_seed(seed)
    nets = [
        TwoHeadNet(arch, ENCODER, None, 1, 4, 0.0, arch_kwargs=ARCHS[arch]).eval()
        for _ in range(3 if full else 1)
    ]
    h, w = size
    if full:
        members = [
            Member(nets[:1], None, ["none", "hflip"]),
            Member(nets[1:], [h + 32, w - 64], ["vflip"], 2.0),
        ]
        ens = Ensemble(members, [1.0, 2.0]).eval()
    else:
        ens = Ensemble([Member(nets, [h + 32, w - 64] if resize else None, list(tta))]).eval()
    with torch.no_grad():
        probs, cls = ens.probs(ens.to_input(_images(n, size)))
    ens.pixel_thr.copy_(torch.stack([_gap_threshold(p) for p in probs.transpose(0, 1)]))
    lo, hi = cls.min(0).values - 1e-3, cls.max(0).values + 1e-3
    ens.label_thr.copy_(torch.stack([lo[0], hi[1], lo[2], torch.tensor(0.0)]))  # class 2 gated out
    ens.min_area.copy_(torch.tensor([50.0, 0.0, 2000.0, 10.0], dtype=torch.float64))
    ens.min_component.copy_(torch.tensor([12.0, 5.0, 0.0, 30.0], dtype=torch.float64))
    return ens


def _gap_threshold(values: torch.Tensor, lo: float = 0.5, hi: float = 0.75) -> torch.Tensor:
    """A threshold in the middle of the widest gap between the values of quantiles ``lo``..``hi``: 25-50 % of
    the pixels above it, and none so close to it that a 1e-6 difference of the exported run flips them (upsampled
    maps have plateaus of equal values, and a quantile is one of them)."""
    v = values.flatten().sort().values
    v = v[int(lo * len(v)) : int(hi * len(v))].unique()
    i = int((v[1:] - v[:-1]).argmax())
    return (v[i] + v[i + 1]) / 2


def _images(n: int, size: tuple[int, int], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _assert_parity(eager: Ensemble, run, images: torch.Tensor) -> None:
    """Probabilities within 1e-4, identical masks, and masks that are not trivial."""
    with torch.no_grad():
        m1, c1, p1 = eager(images)
        m2, c2, p2 = run(images)
    assert (p1 - p2).abs().max() < 1e-4 and (c1 - c2).abs().max() < 1e-4
    assert m2.dtype == torch.bool and torch.equal(m1, m2)
    assert 0.01 < m1.float().mean() < 0.6


# ---- static-shape post-processing ------------------------------------------------------------------------
@pytest.mark.parametrize("compact", [True, False])
def test_component_sizes_static_match_opencv_on_hard_shapes(compact):
    masks = hard_planes(37, 53)
    sizes = component_sizes_static(torch.from_numpy(masks), compact).numpy()
    for i, m in enumerate(masks):
        assert np.array_equal(sizes[i], opencv_sizes(m)), i
    rng = np.random.default_rng(0)
    for m in (
        np.ones((1, 1, 1), bool),
        np.zeros((2, 1, 5), bool),
        rng.random((3, 1, 40)) < 0.5,
        rng.random((3, 40, 1)) < 0.5,
    ):
        assert np.array_equal(
            component_sizes_static(torch.from_numpy(m)).numpy(), np.stack([opencv_sizes(p) for p in m])
        )


@pytest.mark.slow
def test_component_sizes_static_kaggle_size_hard_shapes():
    masks = hard_planes(256, 1600)
    sizes = component_sizes_static(torch.from_numpy(masks)).numpy()
    for i, m in enumerate(masks):
        assert np.array_equal(sizes[i], opencv_sizes(m)), i


@pytest.mark.parametrize("compact", [True, False])
def test_postprocess_static_exported_equals_numpy(compact):
    """Hard shapes, every gating mode, both strides, some planes gated out: eager static == exported == numpy,
    for any batch size of the exported program."""
    masks = hard_planes(40, 96).astype(np.float32)
    n = len(masks) // 4 * 4
    prob = masks[:n].reshape(-1, 4, 40, 96) * 0.8
    prob += np.random.default_rng(3).random(prob.shape, dtype=np.float32) * 0.15
    cls = np.full(prob.shape[:2], 0.9, np.float32)
    cls[1, 2] = 0.2
    params = Params(tuple(ClassParams(0.5, 0.5, a, mc) for a, mc in ((0, 3), (40, 0), (300, 25), (9000, 2))))
    a = {k: torch.from_numpy(v) for k, v in params.arrays().items()}
    thr = (a["label"].float(), a["pixel"].float(), a["min_area"], a["min_component"])

    class Post(torch.nn.Module):
        def __init__(self, soft: bool, stride: int, scale: torch.Tensor | None) -> None:
            super().__init__()
            self.soft, self.stride, self.scale = soft, stride, scale

        def forward(self, p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return postprocess_static(p, c, *thr, self.soft, self.stride, compact, self.scale)

    batch = torch.export.Dim("batch", min=1, max=64)
    scaled = Params(tuple(ClassParams(**{**p.__dict__, "scale": s}) for p, s in zip(params.classes, (0, 0.5, 1, 1.9))),
                    "scaled")  # fmt: skip
    for mode, stride in (("hard", 1), ("soft", 2), ("scaled", 1)):
        soft = mode == "soft"
        rule = scaled if mode == "scaled" else Params(params.classes, mode)
        scale = torch.from_numpy(rule.arrays()["scale"]).float() if mode == "scaled" else None
        ref = np.stack([postprocess(prob[i], cls[i], rule, stride) for i in range(len(prob))])
        p, c = torch.from_numpy(prob), torch.from_numpy(cls)
        assert np.array_equal(postprocess_static(p, c, *thr, soft, stride, compact, scale).numpy(), ref)
        ep = torch.export.export(Post(soft, stride, scale), (p, c), dynamic_shapes=({0: batch}, {0: batch}))
        assert np.array_equal(ep.module()(p, c).numpy(), ref)
        assert np.array_equal(ep.module()(p[1:2], c[1:2]).numpy(), ref[1:2])
        assert ref.any() and not ref.all()


# ---- the exported ensemble -------------------------------------------------------------------------------
SNIPPET = """
import sys
sys.modules["steel"] = None  # `import steel` fails in here: torch alone runs the file
try:
    import steel
    raise SystemExit("steel is importable")
except ImportError:
    pass
import json, numpy as np, torch
path, images_npy, out_npy = sys.argv[1:4]
# --- the README snippet ---
extra = {"manifest.json": ""}
model = torch.export.load(path, extra_files=extra).module()
manifest = json.loads(extra["manifest.json"])
images = torch.from_numpy(np.load(images_npy))  # uint8 (B, H, W), H x W = manifest["image_size"]
with torch.inference_mode():
    masks, cls_probs, mask_probs = model(images)  # bool (B, 4, H, W), float (B, 4), float (B, 4, H, W)
# ---
np.save(out_npy, masks.numpy())
loaded = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in ("steel", "segmentation_models_pytorch", "timm", "pytorch_lightning", "cv2"))
print(json.dumps({"loaded": loaded, "manifest": manifest, "cls": list(cls_probs.shape), "probs": list(mask_probs.shape)}))
"""


def test_pt2_runs_with_torch_alone_and_equals_steel_predict(exported, synth_dir, tmp_path):
    """The README snippet in a process where `import steel` fails: same masks as `steel predict FILE` writes
    (on 4 of the test images: each costs two runs of the six nets)."""
    _, pt2 = exported
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    for name in list_images(synth_dir / "test_images")[:4]:
        shutil.copyfile(synth_dir / "test_images" / name, images_dir / name)
    names = list_images(images_dir)
    from steel.images import read_grey

    np.save(tmp_path / "images.npy", np.stack([read_grey(images_dir / n) for n in names]))
    proc = subprocess.run(
        [sys.executable, "-c", SNIPPET, str(pt2), str(tmp_path / "images.npy"), str(tmp_path / "masks.npy")],
        capture_output=True, text=True, cwd=tmp_path, timeout=600, env=ONE_THREAD_ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []  # nothing of steel / smp / timm / lightning / OpenCV is needed to run it
    assert out["cls"] == [len(names), 4] and out["probs"] == [len(names), 4, 64, 320]
    masks = np.load(tmp_path / "masks.npy")
    assert masks.dtype == bool and masks.shape == (len(names), 4, 64, 320)

    steel_in_process("predict", pt2, "--images", images_dir, "--out", tmp_path / "sub.csv", "--workers", 0)
    table = read_submission(tmp_path / "sub.csv").set_index(["ImageId", "ClassId"])["EncodedPixels"]
    assert [table[(n, c + 1)] for n in names for c in range(4)] == [
        rle.encode(masks[i, c]) for i in range(len(names)) for c in range(4)
    ]
    assert masks.any() and not masks.all()

    man = out["manifest"]
    assert man == read_manifest(pt2)  # the zip entry, read without torch
    assert man["artifact"] == "pt2" and man["usage"] == "torch.export.load(path).module()(images)"
    assert man["labelling"] == "data-dependent sizes + while_loop" and man["device"] == "cpu"
    assert man["thresholds"]["mode"] == "scaled" and man["thresholds"]["classes"]["4"] == {
        "label": 0.49,
        "pixel": 0.52,
        "min_area": 40,
        "min_component": 8,
        "scale": 1.5,
    }
    assert (
        man["input_size"] == [None, [64, 352]]
        and man["channels"] == [1, 1]
        and man["image_size"] == [64, 320]
    )
    assert man["n_models"] == 6 and man["mode"] == "mean" and man["weights"] == [0.5, 0.5]
    assert man["tta"] == [["none"], ["none"]]
    assert set(man["versions"]) >= {"torch", "steel", "segmentation_models_pytorch"}
    assert [m["checkpoints"][0].endswith("fold-0/best.ckpt") for m in man["members"]] == [True, True]


def test_pt2_of_a_dir_equals_eager_and_is_checked(exported, small, tmp_path, capsys):
    ens_dir, pt2 = exported
    eager, _ = build_ensemble(ens_dir)
    model, man = load_exported(pt2)
    _assert_parity(eager, model, _images(3, (64, 320)))
    # the default export checks itself against the eager ensemble and records the result (a one-net dir:
    # the check is the same code for any ensemble)
    out = export(small[0], tmp_path / "checked.pt2")
    assert "export: parity eager vs torch.export" in capsys.readouterr().out
    check = read_manifest(out)["export_check"]
    assert check["max_abs_diff_probs"] < 1e-4 and check["mask_pixels_differing"] == 0


@pytest.mark.parametrize("arch", list(ARCHS))
def test_parity_pt2_and_onnx_64x320(arch, tmp_path):
    """Eager vs .pt2 (saved, loaded back) vs ONNX (onnxruntime), every stage inside, for Unet (two members,
    three nets, four views) and for the decoders of FPN and PSPNet (one net, one view: TTA is Unet's)."""
    ens = tiny_ensemble(arch, (64, 320), full=arch == "Unet", tta=("none",))
    ep = export_program(ens, (64, 320))
    man = {"format": "steel-ensemble/2", "image_size": [64, 320]}
    images = _images(3, (64, 320))
    for name in ("m.pt2", "m.onnx"):
        path = write_program(ep, tmp_path / name, man, "onnx" if name.endswith(".onnx") else "pt2")
        model, got = load_exported(path)
        assert got["artifact"] == path.suffix[1:]
        _assert_parity(ens, model, images)
    _assert_parity(ens, model, images[:1])  # any batch size


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_parity_pt2_and_onnx_256x1600(arch, tmp_path):
    """Kaggle size: .pt2 identical; onnxruntime within 1e-4 with masks that differ only in the rare pixels whose
    probability lies within its rounding of a threshold (millions of dense random-net values leave no gap
    around a threshold). Members at native size: onnxruntime's Resize computes source coordinates with
    out/in instead of torch's in/out, ~1e-4 apart on noise maps at non-integer scales."""
    ens = tiny_ensemble(arch, (256, 1600), full=False, n=2, resize=False)
    ep = export_program(ens, (256, 1600))
    images = _images(2, (256, 1600))
    pt2 = write_program(ep, tmp_path / "m.pt2", {"format": "steel-ensemble/2"})
    _assert_parity(ens, load_exported(pt2)[0], images)
    onnx_file = write_program(ep, tmp_path / "m.onnx", {"format": "steel-ensemble/2"}, "onnx")
    with torch.no_grad():
        (m1, c1, p1), (m2, c2, p2) = ens(images), load_exported(onnx_file)[0](images)
    assert (p1 - p2).abs().max() < 1e-4 and (c1 - c2).abs().max() < 1e-4
    assert (m1 != m2).float().mean() < 1e-4 and 0.01 < m1.float().mean() < 0.6


def test_parity_pt2_256x1600_unet(tmp_path):
    """Kaggle size in the default suite: one tiny Unet member, .pt2 only."""
    torch.manual_seed(0)
    net = TwoHeadNet("Unet", ENCODER, None, 1, 4, 0.0, arch_kwargs=ARCHS["Unet"]).eval()
    ens = Ensemble([Member([net], None, ["none", "hflip"])], None, Params.uniform(0.0, 0.5, 100, 40)).eval()
    images = _images(2, (256, 1600))
    with torch.no_grad():
        ens.pixel_thr.fill_(float(_gap_threshold(ens.probs(ens.to_input(images))[0])))
    path = write_program(export_program(ens, (256, 1600)), tmp_path / "k.pt2", {"format": "steel-ensemble/2"})
    _assert_parity(ens, load_exported(path)[0], images)


def test_parity_aoti_cpu(tmp_path):
    """AOTInductor package (one net: compiling C++ takes ~30-60 s a net on a loaded 2-core machine)."""
    _aoti_parity(tiny_ensemble("Unet", (64, 320), full=False), tmp_path)


@pytest.mark.slow  # AOTInductor compiles C++: minutes for three nets on a loaded 2-core machine
@pytest.mark.parametrize("arch", list(ARCHS))
def test_parity_aoti_cpu_archs(arch, tmp_path):
    _aoti_parity(tiny_ensemble(arch, (64, 320), full=arch == "Unet"), tmp_path)


def _aoti_parity(ens: Ensemble, tmp_path) -> None:
    ep = export_program(ens, (64, 320))
    path = write_program(ep, tmp_path / "c.pt2", {"format": "steel-ensemble/2"}, "pt2", "cpu")
    model, man = load_exported(path)
    assert man["artifact"] == "aoti" and man["device"] == "cpu"
    _assert_parity(ens, model, _images(3, (64, 320)))
    _assert_parity(ens, model, _images(3, (64, 320))[2:])
    with pytest.raises(SteelError, match="compiled for cpu"):
        load_exported(path, "cuda")


# ---- command line, files, errors -------------------------------------------------------------------------
def test_cli_onnx_export_and_predict(small, synth_dir, tmp_path):
    """`steel export --out X.onnx` + `steel predict X.onnx`: the submission holds onnxruntime's masks, which
    equal the .pt2's except where a probability lies within onnxruntime's rounding (~1e-6) of a threshold.
    A one-net dir (resized input, scaled thresholds): converting to ONNX costs about a second a net (two
    members, several nets, TTA and temperature are converted in test_parity_pt2_and_onnx_64x320)."""
    ens_dir, pt2 = small
    onnx_file = tmp_path / "ens.onnx"
    proc = steel_in_process("export", ens_dir, "--out", onnx_file)
    assert "parity eager vs ONNX" in proc.stdout and "MiB, ONNX)" in proc.stdout
    man = read_manifest(onnx_file)
    assert man["artifact"] == "onnx" and man["image_size"] == [64, 320] and "onnxruntime" in man["usage"]
    assert man["export_check"]["max_abs_diff_probs"] < 1e-4
    images_dir = synth_dir / "test_images"
    names = list_images(images_dir)
    steel_in_process(
        "predict", onnx_file, "--images", images_dir, "--out", tmp_path / "sub.csv", "--workers", 0
    )
    from steel.images import read_grey

    images = torch.from_numpy(np.stack([read_grey(images_dir / n) for n in names]))
    (m1, c1, p1), (m2, c2, p2) = load_exported(onnx_file)[0](images), load_exported(pt2)[0](images)
    table = read_submission(tmp_path / "sub.csv").set_index(["ImageId", "ClassId"])["EncodedPixels"]
    assert [table[(n, c + 1)] for n in names for c in range(4)] == [
        rle.encode(m1[i, c].numpy()) for i in range(len(names)) for c in range(4)
    ]
    assert (p1 - p2).abs().max() < 1e-4 and (c1 - c2).abs().max() < 1e-4
    assert (m1 != m2).float().mean() < 1e-4 and m1.any()


def test_old_torchscript_file_is_refused_in_one_line(tmp_path):
    """The layout `torch.jit.save` wrote for the old `steel export` (code/, constants.pkl, extra/manifest.json)."""
    old = tmp_path / "ensemble.pt"
    with zipfile.ZipFile(old, "w") as z:
        z.writestr("ensemble/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("ensemble/code/__torch__/steel/blend.py", "class Ensemble(Module): ...")
        z.writestr("ensemble/constants.pkl", b"\x80\x02).")
        z.writestr(f"ensemble/extra/{MANIFEST}", json.dumps({"format": "steel-ensemble/1"}))
    with pytest.raises(
        SteelError, match=r"TorchScript file .*re-export with `steel export DIR --out FILE.pt2`"
    ):
        read_manifest(old)


def test_export_errors(exported, tmp_path, tmp_path_factory, synth_dir, folds_csv):
    ens_dir, _ = exported
    runs = tiny_runs(tmp_path_factory, synth_dir, folds_csv)
    no_thr = tmp_path / "run"
    (no_thr / "fold-0").mkdir(parents=True)
    (no_thr / "fold-0" / "best.ckpt").symlink_to(runs["a"] / "fold-0" / "best.ckpt")
    cases = [
        ((no_thr, tmp_path / "x.pt2"), {}, "thresholds file not found"),
        ((tmp_path / "missing", tmp_path / "x.pt2"), {}, "not a directory"),
        ((ens_dir, tmp_path / "x.pt"), {}, "is named \\*.pt2"),
        ((ens_dir, tmp_path / "x.onnx"), {"fmt": "onnx", "compile": "cpu"}, "AOTInductor packages are .pt2"),
    ]
    if not torch.cuda.is_available():
        cases.append(((ens_dir, tmp_path / "x.pt2"), {"compile": "cuda"}, "no CUDA device"))
    (tmp_path / "ens").mkdir()
    (tmp_path / "ens" / "ensemble.yaml").write_text(
        "members:\n- run_dir: x\n  checkpoints: [/nope/best.ckpt]\n"
    )
    write_thresholds(tmp_path / "ens")
    cases.append(((tmp_path / "ens", tmp_path / "x.pt2"), {}, "checkpoint /nope/best.ckpt not found"))
    for args, kw, match in cases:
        with pytest.raises(SteelError, match=match):
            export(*args, **kw)
    assert not list(tmp_path.glob("x.*")) and not list(tmp_path.glob(".x.*"))
    bogus = tmp_path / "bogus.pt2"
    with zipfile.ZipFile(bogus, "w") as z:
        z.writestr("m/data.pkl", b"")
    with pytest.raises(SteelError, match="no manifest.json inside"):
        read_manifest(bogus)
    (tmp_path / "text.onnx").write_text("hello")
    with pytest.raises(SteelError, match="not a file from `steel export`"):
        read_manifest(tmp_path / "text.onnx")


WRITER = """
import sys, time
from steel.io import atomic_path
with atomic_path(sys.argv[1], ".pt2") as tmp:
    tmp.write_bytes(b"partial archive")
    print(tmp, flush=True)
    time.sleep(3600)
"""


def test_interrupted_export_temp_is_removed_by_next_export(small, tmp_path):
    """An export killed while saving leaves its hidden temp file; the next export to that path removes it."""
    ens_dir, _ = small
    out = tmp_path / "ens.pt2"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True, env=ONE_THREAD_ENV
    )
    tmp = proc.stdout.readline().strip()
    proc.kill()
    proc.wait()
    assert os.path.exists(tmp) and not out.exists()
    export(ens_dir, out, check=False)
    assert not os.path.exists(tmp) and read_manifest(out)["artifact"] == "pt2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens.pt2"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_parity_cuda_pt2_moved_and_aoti(tmp_path):
    """On a GPU: the CPU-exported .pt2 moved to CUDA, and an AOTInductor package compiled for CUDA, equal the
    eager ensemble on CUDA."""
    ens = tiny_ensemble("Unet", (64, 320), full=False).cuda()
    images = _images(3, (64, 320)).cuda()
    cpu_ep = export_program(tiny_ensemble("Unet", (64, 320), full=False), (64, 320))
    path = write_program(cpu_ep, tmp_path / "m.pt2", {"format": "steel-ensemble/2", "device": "cpu"})
    _assert_parity(ens, load_exported(path, "cuda")[0], images)
    ep = export_program(ens, (64, 320))
    path = write_program(ep, tmp_path / "c.pt2", {"format": "steel-ensemble/2"}, "pt2", "cuda")
    model, man = load_exported(path, "cuda")
    assert man["artifact"] == "aoti" and man["device"] == "cuda"
    _assert_parity(ens, model, images)
