"""steel predict: exported file (torch only) or ensemble dir (eager) -> a valid submission; clear errors; the
submission is validated before it replaces --out; loader workers end with the command. What is predicted with
does not matter here (the export of a blend is tested in test_export.py): a one-net ensemble dir and its .pt2."""

import gc
import shutil
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import steel.predict
from steel import rle
from steel.cli import main as steel_main
from steel.errors import SteelError
from steel.export import load_exported
from steel.images import read_grey
from steel.labels import list_images, read_submission
from tests._ensemble import ONE_THREAD_ENV, one_torch_thread, small_exported  # noqa: F401 (autouse fixture)
from tests.test_lifecycle import kill_parent_and_check


def _steel(*args) -> int:
    """The `steel` command line in this process (exit status)."""
    return steel_main([str(a) for a in args])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(one-net ensemble dir for 64x320 images, scaled-mode thresholds; its .pt2)."""
    return small_exported(tmp_path_factory)


def test_predict_exported_file_writes_scored_submission(exported, synth_dir, tmp_path, capsys):
    """Real process, exported file only: no steel training code / smp is imported; `steel score` accepts it."""
    _, pt2 = exported
    images, sub = synth_dir / "test_images", tmp_path / "sub.csv"
    code = (
        "import sys; from steel.cli import main; "
        f"rc = main(['predict', {str(pt2)!r}, '--images', {str(images)!r}, '--out', {str(sub)!r}, '--workers', '1', '--batch-size', '6']); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('segmentation_models_pytorch', 'timm', 'pytorch_lightning') "
        "or m in ('steel.module', 'steel.model', 'steel.blend', 'steel.data', 'steel.ensemble')]; print('RC', rc, 'IMPORTED', bad)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=ONE_THREAD_ENV
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
    model, _ = load_exported(pt2)
    imgs = np.stack([read_grey(images / n) for n in names[:3]])
    with torch.inference_mode():
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
    ens_dir, pt2 = exported
    images = _subset(synth_dir / "test_images", tmp_path / "images", 5)
    eager, file = tmp_path / "eager.csv", tmp_path / "file.csv"
    assert _steel("predict", ens_dir, "--images", images, "--out", eager, "--workers", 0) == 0
    assert _steel("predict", pt2, "--images", images, "--out", file, "--workers", 0, "--batch-size", 20) == 0
    assert (tmp_path / "eager.csv").read_text() == (tmp_path / "file.csv").read_text()


def _truncated_jpeg(src) -> bytes:
    """A real JPEG of ``src``, cut in the middle of its scan (what an interrupted copy leaves)."""
    ok, data = cv2.imencode(".jpg", read_grey(src))
    assert ok
    return data.tobytes()[: len(data) * 2 // 3]


def test_predict_bad_inputs_fail_with_one_line(exported, synth_dir, tmp_path, capfd):
    """Each ends in exit status 2 and one line on stderr (fd 2: capfd also sees C libraries and loader workers)."""
    _, pt2 = exported
    images = synth_dir / "test_images"
    first = images / list_images(images)[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    only_txt = tmp_path / "only_txt"
    only_txt.mkdir()
    (only_txt / "notes.txt").write_text("not an image")
    corrupt = _subset(images, tmp_path / "corrupt", 1, {"zzz_broken.jpg": b"\xff\xd8 this is not a jpeg"})
    truncated = _subset(images, tmp_path / "truncated", 2, {"m_cut.jpg": _truncated_jpeg(first)})
    other_size = _subset(images, tmp_path / "other_size", 1, {"zzz_small.png": np.zeros((32, 32), np.uint8)})
    all_small = _subset(images, tmp_path / "all_small", 0, {"a.png": np.zeros((32, 320), np.uint8)})
    not_model = tmp_path / "model.pt2"
    not_model.write_text("hello")
    old = tmp_path / "old.pt"  # the layout of a TorchScript file from the old `steel export`
    import zipfile

    with zipfile.ZipFile(old, "w") as z:
        z.writestr("ens/code/__torch__/steel/blend.py", "class Ensemble(Module): ...")
        z.writestr("ens/constants.pkl", b"\x80\x02).")
        z.writestr("ens/extra/manifest.json", '{"format": "steel-ensemble/1"}')
    out = str(tmp_path / "sub.csv")
    (tmp_path / "sub.csv").write_text("old\n")  # a failing run leaves an existing submission untouched
    cases = [
        ([str(pt2), "--images", str(tmp_path / "missing")], "image directory not found"),
        ([str(pt2), "--images", str(empty)], "no images"),
        ([str(pt2), "--images", str(only_txt)], "no images"),
        ([str(pt2), "--images", str(only_txt / "notes.txt")], "not a directory of images"),
        ([str(pt2), "--images", str(corrupt)], "zzz_broken.jpg: truncated or corrupt JPEG"),
        ([str(pt2), "--images", str(truncated)], "m_cut.jpg: truncated or corrupt JPEG"),
        ([str(pt2), "--images", str(other_size)], "zzz_small.png: image is 32x32"),
        (
            [str(pt2), "--images", str(all_small)],
            "a.png: image is 32x320, " + str(pt2) + " was exported for 64x320",
        ),
        ([str(not_model), "--images", str(images)], "model.pt2: not a file from `steel export`"),
        ([str(old), "--images", str(images)], "re-export with `steel export DIR --out FILE.pt2`"),
        ([str(tmp_path / "nope.pt2"), "--images", str(images)], "nope.pt2: not found"),
        ([str(pt2), "--images", str(images), "--batch-size", "0"], "--batch-size 0"),
    ]
    # and with 2 loader workers (forked from this process, so their fd 2 is captured too): the truncated file
    # is named, libjpeg's anonymous warning is not
    cases.append(
        ([str(pt2), "--images", str(truncated), "--workers", "2"], "m_cut.jpg: truncated or corrupt JPEG")
    )
    # the command collects garbage after an error (closing the failed step's progress bar): objects made before
    # are left out of that (~0.4 s a call in a test process holding torch, Lightning and a loaded .pt2)
    gc.freeze()
    try:
        for args, match in cases:
            capfd.readouterr()
            rc = steel_main(
                ["predict", *args, "--out", out, *([] if "--workers" in args else ["--workers", "0"])]
            )
            err = capfd.readouterr().err
            lines = err.strip().splitlines()
            assert rc == 2 and lines[-1].startswith("steel predict: error: ") and match in lines[-1], (
                args,
                err,
            )
            assert "Traceback" not in err and "Premature end of JPEG" not in err, (args, err)
    finally:
        gc.unfreeze()
    assert (tmp_path / "sub.csv").read_text() == "old\n"


def test_submission_validated_before_it_replaces_out(exported, synth_dir, tmp_path, monkeypatch):
    """The validator reads the temp file; when it refuses, --out keeps its old content and no temp is left."""
    _, pt2 = exported
    images = _subset(synth_dir / "test_images", tmp_path / "images", 2)
    out = tmp_path / "sub.csv"
    out.write_text("old\n")
    seen = []

    def refuse(path, images_dir):
        seen.append(path)
        assert read_submission(path)["ImageId"].nunique() == 2  # complete, not yet in place
        assert out.read_text() == "old\n"
        raise SteelError(f"{path}: invalid (test)")

    monkeypatch.setattr(steel.predict, "validate_submission", refuse)
    with pytest.raises(SteelError, match="invalid"):
        steel.predict.predict(pt2, images, out, workers=0)
    assert seen and seen[0] != out and seen[0].parent == out.parent and seen[0].name.startswith(".sub.csv.")
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["images", "sub.csv"]


@pytest.fixture(scope="module")
def many_images(synth_dir, tmp_path_factory):
    """400 test images (copies): enough for `steel predict` to still be running when it is killed."""
    d = tmp_path_factory.mktemp("many") / "images"
    d.mkdir()
    src = synth_dir / "test_images"
    names = list_images(src)
    for i in range(400):
        shutil.copyfile(src / names[i % len(names)], d / f"{i:04d}_{names[i % len(names)]}")
    return d


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_loader_workers_end_with_predict(exported, many_images, tmp_path, sig):
    """Kill `steel predict --workers 2` (the parent only): its two DataLoader workers are gone soon after."""
    _, pt2 = exported
    cmd = [sys.executable, "-m", "steel.cli", "predict", str(pt2), "--images", str(many_images),
           "--out", str(tmp_path / "sub.csv"), "--workers", "2", "--batch-size", "1"]  # fmt: skip
    children = kill_parent_and_check(cmd, sig, 2, env=ONE_THREAD_ENV)
    assert len(children) >= 2
    assert not (tmp_path / "sub.csv").exists() and not list(tmp_path.glob(".sub.csv.*"))
