"""Every experiments/*.yaml parses through the real CLI, builds its full-size model and trains for real on CPU
(its losses, optimiser, scheduler, sampler and augmentations, with a tiny encoder on small images); tiny.yaml's
plumbing run writes the run-directory files and an offline W&B run with the metric keys, resumes, averages
its top-k epochs, and its learning run beats the all-empty baseline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from steel.augment import AUGMENTS
from steel.losses import SEG_LOSSES
from tests.conftest import steel_in_process
from tests.conftest_training import EXPERIMENTS, LEARN_SHAPE, TINY, TINY_PLUMBING, Probe, fit, wandb_records

pytest_plugins = ["tests.conftest_training"]

CONFIGS = sorted(EXPERIMENTS.glob("*.yaml"))
REQUIRED = {
    "unet_effb3.yaml",
    "fpn_effb3.yaml",
    "twohead_softgate.yaml",
    "pspnet_seresnet18.yaml",
    "tiny.yaml",
}
TINY_ENCODER = (
    "tu-test_resnet.r160_in1k"  # timm's test ResNet: ~0.5 M weights, five stages like the real ones
)
# a recipe's sizes shrunk for the 32x160 images of the ``small_synth`` data (multiples of 32 stay so)
SHRUNK = {"train_crop": [32, 64], "train_resize": [32, 128], "val_size": [32, 128]}


def test_required_recipes_exist() -> None:
    assert REQUIRED <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_print_config(config: Path) -> None:
    proc = steel_in_process("fit", "--config", config, "--print_config")
    printed = yaml.safe_load(proc.stdout)
    source = yaml.safe_load(config.read_text())
    for section in (
        "trainer",
        "model",
        "data",
    ):  # every key of the recipe reaches the resolved config unchanged
        for key, value in source[section].items():
            assert printed[section][key] == value, (section, key)
    assert printed["seed_everything"] == source["seed_everything"]
    assert printed["model"]["encoder_weights"] is None  # no network by default


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_recipe_model_builds_and_runs(config: Path) -> None:
    """The recipe's real (full-size) network: its encoder name resolves and a forward pass has the right shapes."""
    from steel.module import SteelModule

    model_args = yaml.safe_load(config.read_text())["model"]
    model = SteelModule(**model_args).eval()
    mask, label = model.predict_proba(torch.rand(1, 1, 64, 320))
    assert mask.shape == (1, 4, 64, 320) and label.shape == (1, 4)
    assert 0 <= mask.min() <= mask.max() <= 1 and 0 <= label.min() <= label.max() <= 1


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_recipe_trains(config: Path, small_synth: tuple[Path, Path], tmp_path: Path) -> None:
    """A forced-CPU fit of the recipe cut to 2 training batches and 1 validation batch (fast_dev_run-sized, but
    with its checkpoints and run files), encoder swapped for a tiny one and sizes shrunk: everything else is the
    recipe's own, and the probe checks that it ran."""
    recipe = yaml.safe_load(config.read_text())
    data_cfg, model_cfg = recipe["data"], recipe["model"]
    shrunk = [
        a for key, size in SHRUNK.items() if data_cfg.get(key) for a in (f"--data.{key}", json.dumps(size))
    ]
    # a stage recipe's earlier run (init_from) is not there: its weights start fresh (tests/test_stages.py)
    stage = ["--init_from", "null"] if recipe.get("init_from") else []
    run = fit(
        config, *small_synth, tmp_path / "fold-0",
        "--trainer.accelerator", "cpu", "--trainer.devices", 1, "--trainer.precision", "32-true",
        "--trainer.max_epochs", 1, "--trainer.limit_train_batches", 2, "--trainer.limit_val_batches", 1,
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=tests.conftest_training.Probe",
        "--model.encoder", TINY_ENCODER, "--data.batch_size", 4, "--data.val_batch_size", 4,
        "--data.num_workers", 0, "--data.pin_memory", "false", *shrunk, *stage,
    )  # fmt: skip
    seen = Probe.seen
    optimizers = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "radam": "RAdam"}
    assert seen["optimizer"] == optimizers[model_cfg["optimizer"]]
    assert bool(seen["schedulers"]) == (model_cfg["scheduler"] != "none")
    samplers = {"random": "RandomSampler", "balanced": "BalancedSampler", "negatives": "NegativesSampler"}
    assert seen["sampler"] == samplers[data_cfg.get("sampler", "random")]
    assert seen["augs"] == [type(t).__name__ for t in AUGMENTS[data_cfg.get("augment", "light")]()]
    h, w = next((SHRUNK[k] for k in ("train_crop", "train_resize") if data_cfg.get(k)), LEARN_SHAPE)
    assert len(seen["batches"]) == 2
    for image_shape, dtype, mask_shape, loss in seen["batches"]:
        assert image_shape == (4, 1, h, w) and dtype == torch.float32 and mask_shape == (4, 4, h, w)
        assert torch.isfinite(torch.tensor(loss))
    assert seen["moved"] > 0  # an optimiser step changed the weights
    parts = {f"train/{p}_loss" for p in SEG_LOSSES[model_cfg["seg_loss"]["name"]]}
    assert parts | {"train/cls_loss", "val/dice", "val/loss"} <= set(seen["metrics"]), seen["metrics"]
    assert (run / "best.ckpt").is_file() and (run / "last.ckpt").is_file()
    assert json.loads((run / "metrics.json").read_text())["fold"] == 0


def test_tiny_plumbing_run_files(tiny_run: Path) -> None:
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["fold"] == 0 and len(metrics["val_dice_per_class"]) == 4
    assert 0.0 <= metrics["best_val_dice"] <= 1.0 and metrics["best_epoch"] in (0, 1)
    assert metrics["wandb_run_id"]
    progress = json.loads((tiny_run / "progress.json").read_text())
    assert {"epoch", "max_epochs", "val_dice", "best_val_dice"} <= set(progress)
    assert progress["epoch"] == progress["max_epochs"] - 1 == 1
    assert progress["best_val_dice"] == pytest.approx(metrics["best_val_dice"])
    assert (tiny_run / "best.ckpt").is_file() and (tiny_run / "last.ckpt").is_file()
    last = torch.load(tiny_run / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 1 and last["global_step"] == 4  # 2 epochs x 2 batches
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert config["run_dir"] == str(tiny_run) and config["data"]["fold"] == 0


def test_tiny_learns_above_empty_baseline(learned_run: Path, learned_baseline: float) -> None:
    """The one learning test: 150 steps on 32x160 images beat predicting nothing (module docstring of
    tests/conftest_training.py for the margins seen over seeds)."""
    metrics = json.loads((learned_run / "metrics.json").read_text())
    assert metrics["best_val_dice"] > learned_baseline + 0.01, (metrics, learned_baseline)


def test_tiny_wandb_offline_run(tiny_run: Path) -> None:
    import wandb

    assert wandb.run is None  # the in-process fit finished its run, as its process's exit would
    runs = list((tiny_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history, config, run = set(), set(), None
    for record in wandb_records(runs[0], finished=True):
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


def test_resume_from_last(tiny_run: Path, synth_dir: Path, folds_csv: Path, tmp_path: Path) -> None:
    run = tmp_path / "fold-0"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("wandb"))
    before = json.loads((run / "progress.json").read_text())
    fit(TINY, synth_dir, folds_csv, run, *TINY_PLUMBING, "--trainer.logger", "false",
        "--ckpt_path", run / "last.ckpt", "--trainer.max_epochs", before["max_epochs"] + 1)  # fmt: skip
    after = json.loads((run / "progress.json").read_text())
    assert after["epoch"] == before["max_epochs"] and after["max_epochs"] == before["max_epochs"] + 1
    last = torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 6  # 4 steps before the resume + 2: the loop went on, it did not restart
    metrics = json.loads((run / "metrics.json").read_text())
    assert (
        metrics["best_val_dice"] >= before["best_val_dice"]
    )  # callback state (best so far) survived the resume


def test_average_top_k(synth_dir: Path, folds_csv: Path, tmp_path: Path) -> None:
    run = tmp_path / "fold-1"
    steel_in_process("fit", "--config", TINY, "--data.data_dir", synth_dir, "--data.folds_csv", folds_csv,
                     "--data.fold", 1, "--run_dir", run, *TINY_PLUMBING, "--trainer.logger", "false",
                     "--trainer.max_epochs", 4, "--average_top_k", 3, "--average_into_best", "true")  # fmt: skip
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
    key = next(k for k in swa["state_dict"] if k.endswith("segmentation_head.0.weight"))
    torch.testing.assert_close(swa["state_dict"][key], torch.stack([s[key] for s in states]).mean(0))
    assert swa["hyper_parameters"]["encoder"] == TINY_ENCODER  # a full checkpoint: load_model works
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["swa_members"] == 3 and metrics["best_source"] in ("swa", "epoch")
    assert metrics["best_val_dice"] >= metrics["swa_val_dice"] - 1e-9
