"""steel demo: the embedded recipe, and (slow) a reduced run of the whole chain, twice (resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steel.demo import recipe_path
from tests.conftest import run_steel

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_recipe_is_experiments_tiny():
    assert recipe_path().is_file()
    assert recipe_path().read_text() == (ROOT / "experiments" / "tiny.yaml").read_text()


def test_demo_refuses_an_out_dir_made_with_other_settings(tmp_path):
    (tmp_path / "demo.json").write_text(json.dumps({"data": {"n_train": 1}}))
    proc = run_steel("demo", "--out", tmp_path, check=False)
    assert proc.returncode == 2 and "holds a demo made with other settings" in proc.stderr


@pytest.mark.slow
def test_demo_small_end_to_end_and_resume(tmp_path):
    args = [
        "demo",
        "--out",
        tmp_path,
        "--n-train",
        60,
        "--n-test",
        20,
        "--folds",
        3,
        "--trials",
        30,
        "--epochs",
        2,
    ]
    first = run_steel(*args, timeout=1800)
    for name in ("report.png", "ensemble.pt2", "submission.csv", "results.json", "blend/thresholds.json"):
        assert (tmp_path / name).is_file(), name
    rows = {r["row"]: r for r in json.loads((tmp_path / "results.json").read_text())["table"]}
    assert set(rows) == {
        "all-empty baseline",
        "default thresholds (blend)",
        "tuned single run",
        "tuned blend",
    }
    assert "mean Dice on the synthetic test images" in first.stdout
    mtime = (tmp_path / "runs/tiny/fold-0/best.ckpt").stat().st_mtime_ns
    second = run_steel(*args, timeout=1800)
    assert "fold 0: already done" in second.stdout
    assert (tmp_path / "runs/tiny/fold-0/best.ckpt").stat().st_mtime_ns == mtime
