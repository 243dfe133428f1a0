"""Every experiments/*.yaml parses through the real CLI; tiny.yaml trains on CPU, beats the all-empty baseline,
writes the run-directory files and an offline W&B run with the metric keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest_training import EXPERIMENTS, TINY, check, steel, wandb_records

pytest_plugins = ["tests.conftest_training"]

CONFIGS = sorted(EXPERIMENTS.glob("*.yaml"))
REQUIRED = {
    "unet_effb3.yaml",
    "fpn_effb3.yaml",
    "twohead_softgate.yaml",
    "pspnet_seresnet18.yaml",
    "tiny.yaml",
}


def test_required_recipes_exist() -> None:
    assert REQUIRED <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_print_config(config: Path) -> None:
    proc = check(steel("fit", "--config", config, "--print_config"))
    printed = yaml.safe_load(proc.stdout)
    source = yaml.safe_load(config.read_text())
    assert printed["model"]["arch"] == source["model"]["arch"]
    assert printed["model"]["encoder_weights"] is None  # no network by default
    assert printed["data"]["fold"] == source["data"]["fold"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_recipe_model_builds_and_runs(config: Path) -> None:
    import torch

    from steel.module import SteelModule

    model_args = yaml.safe_load(config.read_text())["model"]
    model = SteelModule(**model_args).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 64, 320))
    assert out["mask"].shape == (1, 4, 64, 320)


def test_tiny_trains_above_empty_baseline(tiny_run: Path, tiny_baseline: float) -> None:
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["fold"] == 0 and len(metrics["val_dice_per_class"]) == 4
    assert metrics["best_val_dice"] > tiny_baseline + 0.01, (metrics, tiny_baseline)
    assert metrics["wandb_run_id"]
    progress = json.loads((tiny_run / "progress.json").read_text())
    assert set(progress) == {"epoch", "max_epochs", "val_dice", "best_val_dice"}
    assert progress["epoch"] == progress["max_epochs"] - 1
    assert progress["best_val_dice"] == pytest.approx(metrics["best_val_dice"])
    assert (tiny_run / "best.ckpt").is_file() and (tiny_run / "last.ckpt").is_file()
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert config["run_dir"] == str(tiny_run) and config["data"]["fold"] == 0


def test_tiny_wandb_offline_run(tiny_run: Path) -> None:
    runs = list((tiny_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history, config, run = set(), set(), None
    for record in wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "config":
            config |= {item.key for item in record.config.update}
        elif kind == "run":
            run = record.run
    expected = {
        "train/loss_step",
        "train/loss_epoch",
        "train/seg_loss",
        "train/cls_loss",
        "val/loss",
        "val/dice",
        "val/cls_auc",
    }
    expected |= {f"val/dice_{c}" for c in range(1, 5)}
    assert expected <= history, expected - history
    assert any(k.startswith("val/examples") for k in history)  # overlay images
    assert {"cli", "arch", "encoder", "seg_loss", "fold"} <= config
    assert (
        run is not None
        and run.project == "steel"
        and run.run_group == "tiny"
        and run.display_name == "fold-0"
    )
    assert run.run_id == json.loads((tiny_run / "metrics.json").read_text())["wandb_run_id"]


@pytest.mark.slow
def test_resume_from_last(tiny_run: Path, synth_dir: Path, folds_csv: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "fold-0"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("wandb"))
    before = json.loads((run / "progress.json").read_text())
    args = [
        "--data.data_dir",
        synth_dir,
        "--data.folds_csv",
        folds_csv,
        "--run_dir",
        run,
        "--trainer.logger",
        "false",
    ]
    check(
        steel(
            "fit",
            "--config",
            TINY,
            *args,
            "--ckpt_path",
            run / "last.ckpt",
            "--trainer.max_epochs",
            before["max_epochs"] + 3,
        )
    )
    after = json.loads((run / "progress.json").read_text())
    assert after["epoch"] == before["max_epochs"] + 2 and after["max_epochs"] == before["max_epochs"] + 3
    metrics = json.loads((run / "metrics.json").read_text())
    assert (
        metrics["best_val_dice"] >= before["best_val_dice"]
    )  # callback state (best so far) survived the resume


@pytest.mark.slow
def test_average_top_k(synth_dir: Path, folds_csv: Path, tmp_path: Path) -> None:
    import torch

    run = tmp_path / "fold-1"
    args = [
        "--data.data_dir",
        synth_dir,
        "--data.folds_csv",
        folds_csv,
        "--data.fold",
        1,
        "--run_dir",
        run,
        "--trainer.logger",
        "false",
    ]
    check(
        steel(
            "fit",
            "--config",
            TINY,
            *args,
            "--trainer.max_epochs",
            6,
            "--trainer.check_val_every_n_epoch",
            1,
            "--average_top_k",
            3,
            "--average_into_best",
            "true",
        )
    )
    top = sorted((run / "topk").glob("*.ckpt"))
    assert len(top) == 3 and (run / "swa.ckpt").is_file()
    # last.ckpt carries the top-k callback's final state (scores of exactly these files; steel blend reads it)
    callbacks = torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"]
    topk_state = next(
        v for k, v in callbacks.items() if k.startswith("ModelCheckpoint") and v["dirpath"].endswith("topk")
    )
    assert sorted(Path(p).name for p in topk_state["best_k_models"]) == [p.name for p in top]
    states = [torch.load(p, map_location="cpu", weights_only=False)["state_dict"] for p in top]
    swa = torch.load(run / "swa.ckpt", map_location="cpu", weights_only=False)
    key = "net.net.segmentation_head.0.weight"
    torch.testing.assert_close(swa["state_dict"][key], torch.stack([s[key] for s in states]).mean(0))
    assert (
        swa["hyper_parameters"]["encoder"] == "tu-test_resnet.r160_in1k"
    )  # a full checkpoint: load_model works
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["swa_members"] == 3 and metrics["best_source"] in ("swa", "epoch")
    assert metrics["best_val_dice"] >= metrics["swa_val_dice"] - 1e-9
