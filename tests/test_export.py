"""steel export: one TorchScript file (loadable with torch alone, manifest inside) equal to the eager ensemble;
ONNX of one fold net checked against onnxruntime."""

import json
import subprocess
import sys
import zipfile

import cv2
import numpy as np
import pytest
import torch

from steel.blend import Ensemble, Member, build_ensemble
from steel.errors import SteelError
from steel.export import export_onnx, export_torchscript, read_manifest, script_ensemble
from steel.labels import list_images
from steel.module import load_model
from steel.postprocess import Params
from tests._ensemble import ONE_THREAD_ENV, exported_ensemble, one_torch_thread, tiny_runs, write_thresholds  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synth_dir, folds_csv):
    return exported_ensemble(tmp_path_factory, synth_dir, folds_csv)


@pytest.fixture(scope="module")
def eager(exported):
    return build_ensemble(exported[0])


@pytest.fixture(scope="module")
def test_images(synth_dir) -> np.ndarray:
    d = synth_dir / "test_images"
    return np.stack([cv2.imread(str(d / n), cv2.IMREAD_GRAYSCALE) for n in list_images(d)[:8]])


def test_exported_file_loads_with_torch_alone(exported, tmp_path):
    ens_dir, pt = exported
    code = f"""
import json, sys, torch
extra = {{"manifest.json": ""}}
model = torch.jit.load({str(pt)!r}, _extra_files=extra)
manifest = json.loads(extra["manifest.json"])
grey = torch.randint(0, 256, (3, 64, 320), dtype=torch.uint8)
with torch.jit.optimized_execution(False), torch.inference_mode():
    masks, cls, probs = model(grey)
    rgb_masks = model(grey[..., None].expand(-1, -1, -1, 3).contiguous())[0]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("steel", "segmentation_models_pytorch", "timm", "pytorch_lightning", "cv2"))
print(json.dumps({{"masks": [str(masks.dtype), list(masks.shape)], "cls": [str(cls.dtype), list(cls.shape)],
                  "probs": list(probs.shape), "rgb_same": bool(torch.equal(rgb_masks, masks)), "loaded": loaded,
                  "manifest": manifest}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=ONE_THREAD_ENV,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []  # nothing of steel / smp / timm / lightning is needed to run it
    assert out["masks"] == ["torch.bool", [3, 4, 64, 320]] and out["cls"] == ["torch.float32", [3, 4]]
    assert out["probs"] == [3, 4, 64, 320] and out["rgb_same"]
    man = out["manifest"]
    assert man == read_manifest(pt)  # the zip entry, read without torch
    assert man["thresholds"]["classes"]["1"] == {
        "label": 0.49,
        "pixel": 0.52,
        "min_area": 40,
        "min_component": 8,
    }
    assert (
        man["input_size"] == [None, [64, 352]]
        and man["channels"] == [1, 1]
        and man["image_size"] == [64, 320]
    )
    assert (
        man["n_models"] == 6
        and man["mode"] == "mean"
        and man["weights"] == [0.5, 0.5]
        and man["tta"] == [["none"], ["none"]]
    )
    assert set(man["versions"]) >= {"torch", "steel", "segmentation_models_pytorch"}
    assert [m["checkpoints"][0].endswith("fold-0/best.ckpt") for m in man["members"]] == [True, True]


def test_exported_equals_eager(exported, eager, test_images):
    ens_dir, pt = exported
    eager, _ = eager
    scripted = torch.jit.load(str(pt))
    x = torch.from_numpy(test_images)
    with torch.no_grad(), torch.jit.optimized_execution(False):
        m1, c1, p1 = eager(x)
        m2, c2, p2 = scripted(x)
    assert (p1 - p2).abs().max() < 1e-4 and (c1 - c2).abs().max() < 1e-4
    assert torch.equal(m1, m2) and 0.001 < m1.float().mean() < 0.5  # identical, non-trivial masks
    # and the eager ensemble is the weighted mean of its members, each the mean of its folds
    with torch.no_grad():
        xin = eager.to_input(x)
        members = [mem(xin) for mem in eager.members]
    assert torch.allclose(p1, (members[0][0] + members[1][0]) / 2, atol=1e-6)


def test_tta_temperature_weights_script_like_eager(eager, test_images):
    """Flip TTA, temperature and weights: the scripted Ensemble (traced nets) equals the same class run eagerly,
    and a Member's output is the mean over folds of (TTA-mean probability) ** t."""
    eager, spec = eager
    nets = [list(eager.members[0].nets)[:1], list(eager.members[1].nets)[:2]]
    sizes = [m.input_size for m in eager.members]
    members = [Member(n, s, ["none", "hflip", "vflip"], power=2.0) for n, s in zip(nets, sizes)]
    params = Params.uniform(0.2, 0.27, 40, 8)
    ens = Ensemble(members, [1.0, 3.0], params).eval()
    spec = {**spec, "members": [{**m, "input_size": s} for m, s in zip(spec["members"], sizes)]}
    scripted = script_ensemble(ens, spec, params)
    x = torch.from_numpy(test_images[:2])
    with torch.no_grad(), torch.jit.optimized_execution(False):
        m1, c1, p1 = ens(x)
        m2, c2, p2 = scripted(x)
        xin = ens.to_input(x)
        net = nets[1][0]
        up = torch.nn.functional.interpolate(xin, size=(64, 352), mode="bilinear", align_corners=False)
        tta = [
            torch.sigmoid(net(up)["mask"]),
            torch.sigmoid(net(up.flip(-1))["mask"]).flip(-1),
            torch.sigmoid(net(up.flip(-2))["mask"]).flip(-2),
        ]
        fold0 = (
            torch.nn.functional.interpolate(
                sum(tta) / 3, size=(64, 320), mode="bilinear", align_corners=False
            )
            ** 2
        )
        mean_b = sum(Member([n], sizes[1], ["none", "hflip", "vflip"], 2.0)(xin)[0] for n in nets[1]) / 2
        mem_b = members[1](xin)[0]
    assert torch.allclose(
        Member([nets[1][0]], sizes[1], ["none", "hflip", "vflip"], 2.0)(xin)[0], fold0, atol=1e-6
    )
    assert torch.allclose(mem_b, mean_b, atol=1e-6)
    assert torch.allclose(p1, 0.25 * members[0](xin)[0] + 0.75 * mem_b, atol=1e-6)
    assert (p1 - p2).abs().max() < 1e-4 and (c1 - c2).abs().max() < 1e-4
    assert torch.equal(m1, m2) and m1.any()


def test_rgb_is_converted_like_opencv(eager):
    eager, _ = eager
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 64, 320, 3), dtype=np.uint8)
    want = np.stack([cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) for im in rgb]).astype(np.float32) / 255
    got = eager.to_input(torch.from_numpy(rgb))[:, 0].numpy()
    assert np.array_equal(got, want)
    with pytest.raises(RuntimeError, match="must be uint8"):
        eager(torch.zeros(1, 64, 320))


def test_onnx_single_fold_net(tmp_path, synth_dir, folds_csv, tmp_path_factory):
    import onnxruntime as ort

    runs = tiny_runs(tmp_path_factory, synth_dir, folds_csv)
    out, diff = export_onnx(runs["b"], tmp_path / "b.onnx", member=0, fold=1)
    assert diff < 1e-4
    man = read_manifest(out)
    assert man["onnx_input"] == [1, 64, 352] and man["members"][0]["checkpoints"][0].endswith(
        "fold-1/best.ckpt"
    )
    assert man["thresholds"]["classes"]["4"]["pixel"] == 0.52
    x = np.random.default_rng(1).random((3, 1, 64, 352), dtype=np.float32)
    mask, label = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    net = load_model(runs["b"] / "fold-1" / "best.ckpt").net
    with torch.no_grad():
        ref = net(torch.from_numpy(x))
    assert np.abs(mask - torch.sigmoid(ref["mask"]).numpy()).max() < 1e-4 and label.shape == (3, 4)
    with pytest.raises(SteelError, match="--fold 3: member 0 has folds 0..2"):
        export_onnx(runs["b"], tmp_path / "x.onnx", fold=3)


def test_export_errors(exported, tmp_path, tmp_path_factory, synth_dir, folds_csv):
    runs = tiny_runs(tmp_path_factory, synth_dir, folds_csv)
    no_thr = tmp_path / "run"
    (no_thr / "fold-0").mkdir(parents=True)
    (no_thr / "fold-0" / "best.ckpt").symlink_to(runs["a"] / "fold-0" / "best.ckpt")
    with pytest.raises(SteelError, match="thresholds file not found"):
        export_torchscript(no_thr, tmp_path / "x.pt")
    with pytest.raises(SteelError, match="not a directory"):
        export_torchscript(tmp_path / "missing", tmp_path / "x.pt")
    (tmp_path / "ens").mkdir()
    (tmp_path / "ens" / "ensemble.yaml").write_text(
        "members:\n- run_dir: x\n  checkpoints: [/nope/best.ckpt]\n"
    )
    write_thresholds(tmp_path / "ens")
    with pytest.raises(SteelError, match="checkpoint /nope/best.ckpt not found"):
        export_torchscript(tmp_path / "ens", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    bogus = tmp_path / "bogus.pt"
    with zipfile.ZipFile(bogus, "w") as z:
        z.writestr("m/data.pkl", b"")
    with pytest.raises(SteelError, match="no manifest.json inside"):
        read_manifest(bogus)
