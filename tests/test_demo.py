"""steel demo: the embedded recipe, and (slow) a reduced run of the whole chain with its pseudo-label round,
twice (resume)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
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
    """A reduced demo without its pseudo-label round, then again with it: round 1 resumes (nothing retrained),
    the pseudo dir already there (here the test images' true labels, since 2-epoch nets are never confident)
    is used, round 2 trains with it and its row joins the table."""
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
    first = run_steel(*args, "--no-pseudo", timeout=3600)
    for name in ("report.png", "ensemble.pt2", "submission.csv", "results.json", "blend/thresholds.json"):
        assert (tmp_path / name).is_file(), name
    rows = {r["row"] for r in json.loads((tmp_path / "results.json").read_text())["table"]}
    assert rows == {"all-empty baseline", "default thresholds (blend)", "tuned single run", "tuned blend"}
    assert "mean Dice on the synthetic test images" in first.stdout
    mtime = (tmp_path / "runs/demo/fold-0/best.ckpt").stat().st_mtime_ns

    pseudo = tmp_path / "pseudo"  # a `steel pseudo` output dir holding 8 test images with their true labels
    (pseudo / "train_images").mkdir(parents=True)
    names = sorted(p.name for p in (tmp_path / "data/test_images").iterdir())[:8]
    for name in names:
        shutil.copyfile(tmp_path / "data/test_images" / name, pseudo / "train_images" / name)
    truth = pd.read_csv(tmp_path / "data/test_truth.csv")
    truth[truth["ImageId"].isin(names)].to_csv(pseudo / "train.csv", index=False)
    (pseudo / "pseudo.json").write_text(json.dumps({"n_kept": 8}))

    second = run_steel(*args, timeout=3600)
    assert "fold 0: already done" in second.stdout and "already there" in second.stdout
    assert (tmp_path / "runs/demo/fold-0/best.ckpt").stat().st_mtime_ns == mtime
    for name in ("submission_pseudo.csv", "blend-pseudo/thresholds.json", "runs/demo-pseudo/oof/meta.json"):
        assert (tmp_path / name).is_file(), name
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["row"] for r in results["table"]} == rows | {"pseudo-label round (blend)"}
    assert "pseudo-label round vs tuned blend: mean " in second.stdout
    assert set(results["step_seconds"]) >= {"1/10", "3/10", "7/10", "8/10", "10/10"}
    # round 2 trained with the pseudo-labelled images added (each once an epoch), round 1 without
    cfg, cfg1 = (_data_config(tmp_path / f"runs/{r}/fold-0/config.yaml") for r in ("demo-pseudo", "demo"))
    assert cfg["pseudo_dir"] == str(pseudo) and cfg1["pseudo_dir"] is None
    n_fold = int((pd.read_csv(tmp_path / "folds.csv")["fold"] != 0).sum())  # fold 0's training images
    assert cfg["pseudo_share"] == pytest.approx(8 / (n_fold + 8), abs=1e-4)
