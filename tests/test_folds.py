import pandas as pd
import pytest

from steel.folds import HAS, make_folds, split
from steel.labels import read_train
from tests.conftest import run_steel


def test_folds_stratified_and_deterministic(synth_dir, tmp_path):
    out1, out2 = tmp_path / "a.csv", tmp_path / "b.csv"
    run_steel("folds", synth_dir, "--n-folds", 5, "--seed", 7, "--out", out1)
    run_steel("folds", synth_dir, "--n-folds", 5, "--seed", 7, "--out", out2)
    a, b = pd.read_csv(out1), pd.read_csv(out2)
    assert a.equals(b)
    assert a.columns.tolist() == ["ImageId", "fold", *HAS]
    assert sorted(a["fold"].unique()) == list(range(5)) and a["ImageId"].is_unique
    counts = a.groupby("fold")[HAS].sum()
    for col in HAS:
        total = a[col].sum()
        assert (abs(counts[col] - total / 5) <= 1).all(), (col, counts[col].tolist())
    free = (a[HAS].sum(1) == 0).groupby(a["fold"]).sum()
    assert (abs(free - free.sum() / 5) <= 1).all()
    assert (out1.with_suffix(".cmd")).read_text().startswith("steel folds")
    c = pd.read_csv(
        run_steel("folds", synth_dir, "--n-folds", 5, "--seed", 8, "--out", tmp_path / "c.csv")
        and tmp_path / "c.csv"
    )
    assert not c["fold"].equals(a["fold"])


def test_ten_folds_on_bigger_table():
    import numpy as np

    rng = np.random.default_rng(0)
    n = 2000
    table = pd.DataFrame({"ImageId": [f"{i}.jpg" for i in range(n)]})
    from steel.synth import sample_classes

    cls = [sample_classes(rng) for _ in range(n)]
    for c in range(1, 5):
        table[f"has_{c}"] = [int(c in x) for x in cls]
    f = make_folds(table, 10, 42)
    counts = f.groupby("fold")[HAS].sum()
    for col in HAS:
        assert (abs(counts[col] - table[col].sum() / 10) <= 1).all()


def test_split_and_bad_fold(folds_csv, synth_dir):
    from steel.errors import SteelError

    train, val = split(folds_csv, 1)
    assert not set(train) & set(val) and len(train) + len(val) == len(read_train(synth_dir))
    with pytest.raises(SteelError, match="fold 3 outside 0..2"):
        split(folds_csv, 3)
