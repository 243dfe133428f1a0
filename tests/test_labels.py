import numpy as np
import pandas as pd
import pytest

from steel import rle
from steel.errors import SteelError
from steel.labels import read_submission, read_train, write_submission
from tests.conftest import SYNTH_SHAPE, make_synth, steel_in_process


def _fake_data(tmp_path, csv_text, images=("a.jpg", "b.jpg", "c.jpg")):
    import cv2

    (tmp_path / "train_images").mkdir()
    for name in images:
        cv2.imwrite(str(tmp_path / "train_images" / name), np.full((8, 16), 100, np.uint8))
    (tmp_path / "train.csv").write_text(csv_text)
    return tmp_path


def test_long_format_and_defect_free_images(tmp_path):
    d = _fake_data(tmp_path, "ImageId,ClassId,EncodedPixels\na.jpg,3,1 4\na.jpg,1,10 2\nb.jpg,4,5 3\n")
    t = read_train(d)
    assert t["ImageId"].tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert t[["has_1", "has_2", "has_3", "has_4"]].to_numpy().tolist() == [
        [1, 0, 1, 0],
        [0, 0, 0, 1],
        [0, 0, 0, 0],
    ]
    assert t.loc[0, "area_3"] == 4 and t.loc[1, "area_4"] == 3 and t.loc[2, "rle_1"] == ""
    assert t.attrs["shape"] == (8, 16)


def test_old_format_with_four_rows_an_image(tmp_path):
    rows = ["ImageId_ClassId,EncodedPixels"]
    for img in ("a.jpg", "b.jpg", "c.jpg"):
        for c in range(1, 5):
            rows.append(f"{img}_{c},{'3 5' if (img, c) == ('b.jpg', 2) else ''}")
    t = read_train(_fake_data(tmp_path, "\n".join(rows) + "\n"))
    assert (
        t["has_2"].tolist() == [0, 1, 0]
        and t.loc[1, "area_2"] == 5
        and t[["has_1", "has_3", "has_4"]].to_numpy().sum() == 0
    )


@pytest.mark.parametrize(
    "csv, message",
    [
        ("ImageId,EncodedPixels\na.jpg,1 2\n", "missing column 'ClassId'"),
        (
            "ImageId,ClassId,EncodedPixels\na.jpg,1,1 2\nb.jpg,2,3 x\n",
            "line 3: RLE of b.jpg class 2 malformed",
        ),
        ("ImageId,ClassId,EncodedPixels\nzzz.jpg,1,1 2\n", "line 2: image zzz.jpg has no file"),
        ("ImageId,ClassId,EncodedPixels\na.jpg,5,1 2\n", "line 2: class '5' outside 1..4"),
        (
            "ImageId,ClassId,EncodedPixels\na.jpg,1,1 2\na.jpg,1,5 2\n",
            "line 3: duplicate row for image a.jpg class 1",
        ),
        ("ImageId,ClassId,EncodedPixels\na.jpg,1,1 200\n", "ends past the last pixel 128"),
    ],
)
def test_bad_input_names_the_problem(tmp_path, csv, message):
    d = _fake_data(tmp_path, csv)
    with pytest.raises(SteelError, match=message):
        read_train(d)
    proc = steel_in_process("folds", d, "--n-folds", 2, "--out", tmp_path / "f.csv", check=False)
    assert proc.returncode == 2 and not (tmp_path / "f.csv").exists()
    (line,) = proc.stderr.strip().splitlines()  # one line (the real-process exit path: tests/test_cli.py)
    assert line.startswith("steel folds: error: ") and message.split(":")[-1].strip().split("'")[0] in line


def test_submission_round_trip_both_formats(tmp_path):
    ids = ["x.jpg", "y.jpg"]
    rles = [["1 2", "", "", "7 1"], ["", "", "3 3", ""]]
    write_submission(ids, rles, tmp_path / "s.csv")
    df = pd.read_csv(tmp_path / "s.csv", keep_default_na=False)
    assert df.columns.tolist() == ["ImageId", "EncodedPixels", "ClassId"] and len(df) == 8
    back = read_submission(tmp_path / "s.csv")
    got = {(r.ImageId, r.ClassId): r.EncodedPixels for r in back.itertuples()}
    assert got[("x.jpg", 4)] == "7 1" and got[("y.jpg", 3)] == "3 3" and got[("y.jpg", 1)] == ""
    old = pd.DataFrame(
        {
            "ImageId_ClassId": [f"{i}_{c}" for i in ids for c in range(1, 5)],
            "EncodedPixels": [s for r in rles for s in r],
        }
    )
    old.to_csv(tmp_path / "old.csv", index=False)
    back_old = read_submission(tmp_path / "old.csv")
    assert {(r.ImageId, r.ClassId): r.EncodedPixels for r in back_old.itertuples()} == got


def test_synth_layout_and_determinism(synth_dir, tmp_path):
    for name in ("train_images", "test_images", "train.csv", "test_truth.csv", "sample_submission.csv"):
        assert (synth_dir / name).exists(), name
    t = read_train(synth_dir)
    assert len(t) == 60 and t.attrs["shape"] == SYNTH_SHAPE
    for r in t.itertuples():
        for c in range(1, 5):
            s = getattr(r, f"rle_{c}")
            assert rle.decode(s, SYNTH_SHAPE).sum() == getattr(r, f"area_{c}")
    # same seed, same data
    again = tmp_path / "again"
    make_synth(again, 60, 20, 3, SYNTH_SHAPE)
    assert (again / "train.csv").read_text() == (synth_dir / "train.csv").read_text()
    sample = pd.read_csv(synth_dir / "sample_submission.csv")
    assert len(sample) == 4 * 20


def test_synth_class_mix_resembles_kaggle(tmp_path):
    from steel.synth import sample_classes

    rng = np.random.default_rng(0)
    cls = [sample_classes(rng) for _ in range(20000)]
    n_def = sum(bool(c) for c in cls)
    assert 0.50 < n_def / len(cls) < 0.56  # ~47 % defect-free
    share3 = sum(3 in c for c in cls) / n_def
    share2 = sum(2 in c for c in cls) / n_def
    two = sum(len(c) == 2 for c in cls) / len(cls)
    assert 0.68 < share3 < 0.80 and share2 < 0.08 and 0.04 < two < 0.08
