import numpy as np
import pandas as pd
import pytest

from steel import rle
from steel.errors import SteelError
from steel.metrics import CompetitionDice, dice_per_pair, score_submission
from tests.conftest import run_steel, steel_in_process


def _setup(tmp_path):
    import cv2

    (tmp_path / "imgs").mkdir()
    for n in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(tmp_path / "imgs" / n), np.zeros((4, 5), np.uint8))
    # a: class 1 pixels 1..4 (4 px); b: class 3 pixels 1..10
    (tmp_path / "truth.csv").write_text("ImageId,ClassId,EncodedPixels\na.jpg,1,1 4\nb.jpg,3,1 10\n")
    return tmp_path


def _sub(tmp_path, rows):
    df = pd.DataFrame(rows, columns=["ImageId", "EncodedPixels", "ClassId"])
    df.to_csv(tmp_path / "sub.csv", index=False)
    return tmp_path / "sub.csv"


def test_score_by_hand(tmp_path):
    d = _setup(tmp_path)
    rows = [(i, "", c) for i in ("a.jpg", "b.jpg") for c in range(1, 5)]
    rows[0] = ("a.jpg", "3 4", 1)  # pred 3..6 vs truth 1..4: inter 2 -> 2*2/(4+4) = 0.5
    rows[1] = ("a.jpg", "1 1", 2)  # false positive on empty truth -> 0
    rows[6] = ("b.jpg", "1 5", 3)  # 2*5/(5+10) = 2/3
    s = score_submission(_sub(tmp_path, rows), d / "truth.csv", d / "imgs")
    got = s[[f"dice_{c}" for c in range(1, 5)]].to_numpy()
    expected = np.array([[0.5, 0, 1, 1], [1, 1, 2 / 3, 1]])
    assert np.allclose(got, expected)
    proc = steel_in_process("score", d / "sub.csv", "--truth", d / "truth.csv", "--images", d / "imgs")
    lines = proc.stdout.splitlines()
    assert f"mean dice {expected.mean():.5f}" in lines[0]  # 0.77083
    for c, value in zip(range(1, 5), expected.mean(0)):  # 0.75, 1, 0.83333, 1
        assert sum(f"class {c}: {value:.5f}" in line for line in lines) == 1, (c, proc.stdout)


def test_score_rejects_malformed(tmp_path):
    d = _setup(tmp_path)
    rows = [(i, "", c) for i in ("a.jpg", "b.jpg") for c in range(1, 5)]
    bad = list(rows)
    bad[2] = ("a.jpg", "4 1 1 1", 3)
    proc = run_steel(
        "score", _sub(tmp_path, bad), "--truth", d / "truth.csv", "--images", d / "imgs", check=False
    )
    assert (
        proc.returncode == 2
        and "line 4: RLE of a.jpg class 3 malformed" in proc.stderr
        and "Traceback" not in proc.stderr
    )
    with pytest.raises(SteelError, match="7 rows, expected 8; e.g. no row for image b.jpg class 4"):
        score_submission(_sub(tmp_path, rows[:-1]), d / "truth.csv", d / "imgs")
    with pytest.raises(SteelError, match="image zz.jpg is not in"):
        score_submission(_sub(tmp_path, rows + [("zz.jpg", "", 1)]), d / "truth.csv", d / "imgs")
    with pytest.raises(SteelError, match="duplicate row"):
        score_submission(_sub(tmp_path, rows[:-1] + [rows[0]]), d / "truth.csv", d / "imgs")


def test_perfect_and_empty_submission_on_synth(synth_dir, tmp_path):
    truth = pd.read_csv(synth_dir / "test_truth.csv")
    ids = sorted(p.name for p in (synth_dir / "test_images").iterdir())
    perfect = {(r.ImageId, r.ClassId): r.EncodedPixels for r in truth.itertuples()}
    rows = [(i, perfect.get((i, c), ""), c) for i in ids for c in range(1, 5)]
    s = score_submission(_sub(tmp_path, rows), synth_dir / "test_truth.csv", synth_dir / "test_images")
    assert s.iloc[:, 1:].to_numpy().min() == 1.0
    empty = [(i, "", c) for i in ids for c in range(1, 5)]
    s = score_submission(_sub(tmp_path, empty), synth_dir / "test_truth.csv", synth_dir / "test_images")
    assert np.isclose(s.iloc[:, 1:].to_numpy().mean(), 1 - len(truth) / (4 * len(ids)))


def test_torchmetrics_dice_matches_numpy():
    import torch

    rng = np.random.default_rng(0)
    pred = rng.uniform(size=(6, 4, 8, 9)) > 0.7
    truth = rng.uniform(size=(6, 4, 8, 9)) > 0.8
    pred[0] = False
    truth[0] = False
    # image 1, class 1 by hand: 3 predicted pixels, 2 true, 1 shared -> 2 * 1 / (3 + 2) = 0.4
    pred[1, 0], truth[1, 0] = False, False
    pred[1, 0, 0, :3] = True
    truth[1, 0, 0, 2:4] = True
    # image 2, class 2: a prediction on an empty truth -> 0; image 0: empty/empty everywhere -> 1
    pred[2, 1], truth[2, 1] = False, False
    pred[2, 1, 4, 4] = True
    m = CompetitionDice()
    m.update(torch.from_numpy(pred[:3]), torch.from_numpy(truth[:3]))
    m.update(torch.from_numpy(pred[3:]), torch.from_numpy(truth[3:]))
    mean, per_class = m.compute()
    ref = dice_per_pair(pred, truth)
    assert ref[0].tolist() == [1, 1, 1, 1] and ref[1, 0] == pytest.approx(0.4) and ref[2, 1] == 0
    assert ((ref > 0) & (ref < 1)).sum() > 10  # mostly partial overlaps: the sums are really exercised
    assert np.isclose(mean.item(), ref.mean()) and np.allclose(per_class.numpy(), ref.mean(0))
    # and the numpy reference against the RLE-level definition on one pair: |A n B| from decoded strings
    a, b = rle.decode(rle.encode(pred[3, 2]), (8, 9)), rle.decode(rle.encode(truth[3, 2]), (8, 9))
    assert ref[3, 2] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
