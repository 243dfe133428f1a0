"""steel demo: the embedded recipe, and (slow) a reduced run of the whole chain with its pseudo-label round,
twice (resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from steel.demo import recipe_path
from tests.conftest import run_steel


def test_embedded_recipe_is_a_valid_config():
    """The packaged demo recipe parses as a LightningCLI config (the same check as experiments/)."""
    assert recipe_path().is_file() and recipe_path().name == "demo.yaml"
    proc = run_steel("fit", "--config", recipe_path(), "--print_config")
    assert "sampler: balanced" in proc.stdout and "tu-test_resnet" in proc.stdout


def test_demo_refuses_an_out_dir_made_with_other_settings(tmp_path):
    (tmp_path / "demo.json").write_text(json.dumps({"data": {"n_train": 1}}))
    proc = run_steel("demo", "--out", tmp_path, check=False)
    assert proc.returncode == 2 and "holds a demo made with other settings" in proc.stderr


def _data_config(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())["data"]
    return data.get("init_args", data)


@pytest.mark.slow
def test_demo_small_end_to_end_with_pseudo_round_and_resume(tmp_path):
    args = ["demo", "--out", tmp_path, "--n-train", 60, "--n-test", 20, "--folds", 3, "--trials", 30,
            "--epochs", 2, "--pseudo-hi", 0.5, "--pseudo-lo", 0.5]  # fmt: skip
    first = run_steel(*args, timeout=3600)
    for name in ("report.png", "ensemble.pt2", "submission.csv", "submission_pseudo.csv", "results.json",
                 "blend/thresholds.json", "blend-pseudo/thresholds.json", "pseudo/train.csv"):  # fmt: skip
        assert (tmp_path / name).is_file(), name
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["row"]: r for r in results["table"]}
    assert set(rows) == {
        "all-empty baseline",
        "default thresholds (blend)",
        "tuned single run",
        "tuned blend",
        "pseudo-label round (blend)",
    }
    assert "mean Dice on the synthetic test images" in first.stdout
    assert "pseudo-label round vs tuned blend: mean " in first.stdout
    assert set(results["step_seconds"]) >= {"1/10", "3/10", "8/10", "10/10"}
    # round 2 trained with the pseudo-labelled images added (each once an epoch), round 1 without
    kept = json.loads((tmp_path / "pseudo/pseudo.json").read_text())["n_kept"]
    cfg, cfg1 = (_data_config(tmp_path / f"runs/{r}/fold-0/config.yaml") for r in ("demo-pseudo", "demo"))
    assert cfg["pseudo_dir"] == str(tmp_path / "pseudo") and kept > 0 and cfg1["pseudo_dir"] is None
    assert cfg["pseudo_share"] == pytest.approx(kept / (40 + kept), abs=1e-4)  # 40 = 60 images less a third
    mtime = (tmp_path / "runs/demo/fold-0/best.ckpt").stat().st_mtime_ns
    second = run_steel(*args, timeout=3600)
    assert "fold 0: already done" in second.stdout
    assert (tmp_path / "runs/demo/fold-0/best.ckpt").stat().st_mtime_ns == mtime
