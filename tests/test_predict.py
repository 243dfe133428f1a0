"""steel predict: exported file (torch only) or ensemble dir (eager) -> a valid submission; clear errors."""

import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from steel import rle
from steel.cli import main as steel_main
from steel.labels import list_images, read_submission
from tests._ensemble import ONE_THREAD_ENV, exported_ensemble, one_torch_thread  # noqa: F401 (autouse fixture)
from tests.conftest import run_steel


def _steel(*args) -> int:
    """The `steel` command line in this process (exit status)."""
    return steel_main([str(a) for a in args])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synth_dir, folds_csv):
    return exported_ensemble(tmp_path_factory, synth_dir, folds_csv)


def test_predict_exported_file_writes_scored_submission(exported, synth_dir, tmp_path, capsys):
    """Real process, exported file only: no steel training code / smp is imported; `steel score` accepts it."""
    _, pt = exported
    images, sub = synth_dir / "test_images", tmp_path / "sub.csv"
    code = (
        "import sys; from steel.cli import main; "
        f"rc = main(['predict', {str(pt)!r}, '--images', {str(images)!r}, '--out', {str(sub)!r}, '--workers', '1', '--batch-size', '6']); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('segmentation_models_pytorch', 'timm', 'pytorch_lightning') "
        "or m in ('steel.module', 'steel.model', 'steel.blend', 'steel.data')]; print('RC', rc, 'IMPORTED', bad)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ONE_THREAD_ENV
    )
    assert "RC 0 IMPORTED []" in proc.stdout, proc.stdout + proc.stderr
    assert "(validated)" in proc.stdout and "predict: 100%" in proc.stderr  # progress bar
    names = list_images(images)
    got = read_submission(sub)
    assert len(got) == 4 * len(names) and set(got["ImageId"]) == set(names)
    capsys.readouterr()
    assert _steel("score", sub, "--truth", synth_dir / "test_truth.csv", "--images", images) == 0
    assert capsys.readouterr().out.startswith("mean dice ")

    # the RLEs are the exported model's masks, "" where empty
    model = torch.jit.load(str(pt))
    imgs = np.stack([cv2.imread(str(images / n), cv2.IMREAD_GRAYSCALE) for n in names[:3]])
    with torch.no_grad(), torch.jit.optimized_execution(False):
        masks = model(torch.from_numpy(imgs))[0].numpy()
    table = got.set_index(["ImageId", "ClassId"])["EncodedPixels"]
    for i, n in enumerate(names[:3]):
        for c in range(4):
            assert table[(n, c + 1)] == rle.encode(masks[i, c])
    assert (got["EncodedPixels"] == "").any() and (got["EncodedPixels"] != "").any()


def _subset(src, dst, n: int, extra: dict | None = None):
    """dst/ with the first n images of src (and extra name -> bytes / array files)."""
    dst.mkdir()
    for name in list_images(src)[:n]:
        shutil.copyfile(src / name, dst / name)
    for name, data in (extra or {}).items():
        if isinstance(data, bytes):
            (dst / name).write_bytes(data)
        else:
            cv2.imwrite(str(dst / name), data)
    return dst


def test_predict_dir_eager_matches_exported(exported, synth_dir, tmp_path):
    ens_dir, pt = exported
    images = _subset(synth_dir / "test_images", tmp_path / "images", 5)
    eager, file = tmp_path / "eager.csv", tmp_path / "file.csv"
    assert _steel("predict", ens_dir, "--images", images, "--out", eager, "--workers", 0) == 0
    assert _steel("predict", pt, "--images", images, "--out", file, "--workers", 0, "--batch-size", 20) == 0
    assert (tmp_path / "eager.csv").read_text() == (tmp_path / "file.csv").read_text()


def test_predict_bad_inputs_fail_with_one_line(exported, synth_dir, tmp_path, capsys):
    _, pt = exported
    images = synth_dir / "test_images"
    empty = tmp_path / "empty"
    empty.mkdir()
    only_txt = tmp_path / "only_txt"
    only_txt.mkdir()
    (only_txt / "notes.txt").write_text("not an image")
    corrupt = _subset(images, tmp_path / "corrupt", 1, {"zzz_broken.jpg": b"\xff\xd8 this is not a jpeg"})
    other_size = _subset(images, tmp_path / "other_size", 1, {"zzz_small.png": np.zeros((32, 32), np.uint8)})
    not_model = tmp_path / "model.pt"
    not_model.write_text("hello")
    out = str(tmp_path / "sub.csv")
    (tmp_path / "sub.csv").write_text("old\n")  # a failing run leaves an existing submission untouched
    cases = [
        ([str(pt), "--images", str(tmp_path / "missing")], "image directory not found"),
        ([str(pt), "--images", str(empty)], "no images"),
        ([str(pt), "--images", str(only_txt)], "no images"),
        ([str(pt), "--images", str(only_txt / "notes.txt")], "not a directory of images"),
        ([str(pt), "--images", str(corrupt)], "zzz_broken.jpg: cannot read image"),
        ([str(pt), "--images", str(other_size)], "zzz_small.png: image is 32x32"),
        ([str(not_model), "--images", str(images)], "not a TorchScript file from `steel export`"),
        ([str(tmp_path / "nope.pt"), "--images", str(images)], "nope.pt: not found"),
        ([str(pt), "--images", str(images), "--batch-size", "0"], "--batch-size 0"),
    ]
    for args, match in cases:
        capsys.readouterr()
        rc = steel_main(["predict", *args, "--out", out, "--workers", "0"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("steel predict: error: ") and match in err[-1], (args, err)
        assert not any("Traceback" in line for line in err)
    assert (tmp_path / "sub.csv").read_text() == "old\n"
    # and in a real process, with loader workers
    proc = run_steel("predict", pt, "--images", corrupt, "--out", out, "--workers", "2", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1].startswith("steel predict: error: ")
        and "zzz_broken.jpg: cannot read image" in proc.stderr
    )
