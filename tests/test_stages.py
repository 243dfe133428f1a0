"""Training stages and the winners' training tricks.

Stages: stage 1 fitted on 2 folds, then a real stage-2 launch of them on CPU (stage 2 starts each fold from the
same fold of stage 1: its first validation dice is at stage 1's level, far above the untrained net's, with a
fresh optimiser and step count); stages refused before anything runs when the earlier run is on another split, a
fold differs, the earlier fold is unfinished, or a run dir would mix two lineages; a classification-only run's
encoder under a segmentation net (12th place) through ``steel fit``; the stage recipes chain to recipes whose
weights fit.
Tricks: mixup of images and masks, label smoothing, SCSE decoder attention, crops off the black margin.

Every launch here says --executor local (sbatch may be on PATH) and runs its folds without W&B."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from steel.errors import SteelError
from tests.conftest import run_steel, steel_in_process
from tests.conftest_training import EXPERIMENTS, TINY

pytest_plugins = ["tests.conftest_training"]

WHOLE = ("--data.train_crop", "null", "--data.batch_size", 8, "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false")  # fmt: skip
# stage 1: 4 epochs x 3 steps of whole 32x160 images (enough to leave the untrained net's dice far behind)
STAGE1 = ("--trainer.max_epochs", 4, "--trainer.check_val_every_n_epoch", 2, *WHOLE)
# stage 2: one epoch (3 steps) at 0.1 x the rate, then its first validation
STAGE2 = ("--trainer.max_epochs", 1, "--model.lr", 0.0003, *WHOLE)
TINY_ENCODER = "tu-test_resnet.r160_in1k"


def _launch(*args: object, check: bool = True):
    return steel_in_process("launch", "--config", TINY, "--executor", "local", "--no-oof", *args, check=check)


@pytest.fixture(scope="module")
def two_folds(small_synth: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data dir, folds csv): the 60 small synthetic images in 2 folds."""
    data, _ = small_synth
    folds = tmp_path_factory.mktemp("two_folds") / "folds.csv"
    steel_in_process("folds", data, "--n-folds", 2, "--seed", 42, "--out", folds)
    return data, folds


@pytest.fixture(scope="module")
def stages(two_folds: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Stage 1 (tiny.yaml) on 2 folds, stage 2 launched on them (--init-from stage 1), and the val/dice of the
    untrained net each stage 1 fold started from (``steel validate`` without weights: same seed, same net).

    Stage 1 is what ``steel launch`` leaves, made in this process: its split as the run dir's folds.csv and the
    ``steel fit`` of each fold into fold-K (a launch would start the same command as a process); stage 2, the
    launch under test, starts its folds as real processes."""
    data, folds = two_folds
    root = tmp_path_factory.mktemp("stages")
    s1 = root / "s1"
    s1.mkdir()
    (s1 / "folds.csv").write_bytes(folds.read_bytes())
    for k in range(2):
        steel_in_process("fit", "--config", TINY, "--data.data_dir", data, "--data.folds_csv", folds,
                         "--data.fold", k, "--run_dir", s1 / f"fold-{k}", *STAGE1)  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        second = _launch("--run-dir", root / "s2", "--init-from", s1, "--data-dir", data, "--folds-csv", folds,
                         "--parallel", 2, "--", *STAGE2)  # fmt: skip
    untrained = []
    for k in range(2):
        steel_in_process("validate", "--config", TINY, "--data.data_dir", data, "--data.folds_csv", folds,
                         "--data.fold", k, "--run_dir", root / f"untrained-{k}", *WHOLE)  # fmt: skip
        untrained.append(json.loads((root / f"untrained-{k}" / "validate.json").read_text())["val/dice"])
    return {"root": root, "data": data, "folds": folds, "second": second, "untrained": untrained}


def _metrics(run: Path, k: int) -> dict:
    return json.loads((run / f"fold-{k}" / "metrics.json").read_text())


def test_stage_two_starts_each_fold_from_the_same_fold_of_stage_one(stages: dict) -> None:
    s1, s2 = stages["root"] / "s1", stages["root"] / "s2"
    assert "fold 1: done" in stages["second"].stdout
    for k in range(2):
        one, two = _metrics(s1, k), _metrics(s2, k)
        assert two["init_from"] == str(s1 / f"fold-{k}" / "best.ckpt") and two["init_part"] == "full"
        assert two["split_hash"] == one["split_hash"] and two["fold"] == k
        untrained = stages["untrained"][k]
        assert one["best_val_dice"] > untrained + 0.3, (one, untrained)  # stage 1 learnt something
        # stage 2's first validation (after 3 steps at 0.1 x lr) is at stage 1's level, not the untrained net's
        assert two["best_epoch"] == 0 and abs(two["best_val_dice"] - one["best_val_dice"]) < 0.05, (one, two)
        last = torch.load(s2 / f"fold-{k}" / "last.ckpt", map_location="cpu", weights_only=False)
        assert last["epoch"] == 0 and last["global_step"] == 3  # a fresh epoch and step count (stage 1: 12)
        steps = {int(s["step"]) for s in last["optimizer_states"][0]["state"].values()}
        assert steps == {3}  # a fresh optimiser: its 3 steps, no moments carried over from stage 1
        assert last["lr_schedulers"][0]["last_epoch"] == 3  # a fresh schedule
        config = yaml.safe_load((s2 / f"fold-{k}" / "config.yaml").read_text())
        assert config["init_from"] == str(s1) and config["model"]["lr"] == 0.0003


def test_stage_on_another_split_is_refused(stages: dict, tmp_path: Path) -> None:
    """An earlier run on another split: one line, exit 2 (a real process), no fold started. Its checkpoints'
    own records are checked too when the earlier run dir has no folds.csv."""
    from steel.folds import make_folds, split_hash, write_folds
    from steel.labels import read_train
    from steel.rundir import split_of
    from tests._ensemble import save_checkpoint

    data, folds = stages["data"], stages["folds"]
    other = tmp_path / "other.csv"
    write_folds(make_folds(read_train(data), 2, seed=7), other)
    assert split_hash(other) != split_hash(folds)
    earlier = tmp_path / "earlier"
    for k in range(2):
        fold = earlier / f"fold-{k}"
        save_checkpoint(fold / "best.ckpt", k, None, split_of(other, k))
        (fold / "last.ckpt").write_bytes((fold / "best.ckpt").read_bytes())
        (fold / "metrics.json").write_text(json.dumps({"complete": True, "best_val_dice": 0.5}))
    (earlier / "folds.csv").write_text(other.read_text())
    run = tmp_path / "stage2"
    proc = run_steel("launch", "--config", TINY, "--executor", "local", "--data-dir", data, "--folds-csv", folds,
                     "--run-dir", run, "--init-from", earlier, "--", *STAGE2, check=False)  # fmt: skip
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"steel launch: error: --init-from {earlier}: that run is on another split")
    assert split_hash(other) in err and split_hash(folds) in err
    assert not list(run.glob("fold-*")) and not list(run.glob("fold-*/train.log"))  # nothing ran
    (earlier / "folds.csv").unlink()  # the checkpoints still say which split they were trained on
    proc = _launch(
        "--data-dir", data, "--folds-csv", folds, "--run-dir", run, "--init-from", earlier, check=False
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert (
        "--init_from: fold 0: " in err and "was trained on another split" in err and split_hash(other) in err
    )
    assert not list(run.glob("fold-*"))


def test_other_fold_unfinished_fold_and_mixed_lineage_are_refused(stages: dict, tmp_path: Path) -> None:
    root, data, folds = stages["root"], stages["data"], stages["folds"]
    s1 = root / "s1"
    where = (
        "--data.data_dir",
        data,
        "--data.folds_csv",
        folds,
        "--data.fold",
        0,
        "--run_dir",
        tmp_path / "f0",
    )
    # steel fit: fold 0 from fold 1's checkpoint saw fold 0's validation images
    proc = steel_in_process("fit", "--config", TINY, *where, "--init_from", s1 / "fold-1" / "best.ckpt",
                            *STAGE2, check=False)  # fmt: skip
    err = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "was trained as fold 1" in err and "in-sample" in err, proc.stderr
    # an earlier run whose fold is not finished
    partial = tmp_path / "partial"
    (partial / "fold-0").mkdir(parents=True)
    (partial / "fold-0" / "last.ckpt").write_bytes((s1 / "fold-0" / "last.ckpt").read_bytes())
    proc = steel_in_process("fit", "--config", TINY, *where, "--init_from", partial, *STAGE2, check=False)
    assert proc.returncode == 2 and "its fold 0 is not finished" in proc.stderr, proc.stderr
    proc = _launch("--data-dir", data, "--folds-csv", folds, "--run-dir", tmp_path / "r", "--init-from",
                   s1 / "fold-0" / "best.ckpt", check=False)  # fmt: skip
    assert proc.returncode == 2 and "give the earlier run dir (fold K starts from its fold K)" in proc.stderr
    # stage 2's run dir again, without --init-from: its folds were started from stage 1
    proc = _launch("--data-dir", data, "--folds-csv", folds, "--run-dir", root / "s2", check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert f"fold 0 of {root / 's2'} was started from {s1}" in err and "this launch says scratch" in err


def test_classifier_encoder_starts_a_segmentation_run(two_folds: tuple[Path, Path], tmp_path: Path) -> None:
    """12th place through ``steel fit``: a classification-only run (seg_loss_weight 0, best.ckpt by
    val/cls_auc), then a Unet with SCSE attention whose encoder (only) comes from the same fold of it."""
    from steel.checkpoints import load_checkpoint

    data, folds = two_folds
    base = ("--data.data_dir", data, "--data.folds_csv", folds, "--data.fold", 1, "--trainer.max_epochs", 1,
            "--trainer.limit_train_batches", 2, *WHOLE)  # fmt: skip
    cls_run = tmp_path / "cls" / "fold-1"
    steel_in_process("fit", "--config", TINY, *base, "--run_dir", cls_run, "--model.seg_loss_weight", 0,
                     "--model.cls_loss_weight", 1, "--monitor", "val/cls_auc")  # fmt: skip
    metrics = json.loads((cls_run / "metrics.json").read_text())
    assert metrics["monitor"] == "val/cls_auc" and 0 <= metrics["best_score"] <= 1
    seg_run = tmp_path / "seg" / "fold-1"
    scse = '{"decoder_attention_type": "scse", "decoder_channels": [32, 32, 16, 16, 16]}'
    steel_in_process("fit", "--config", TINY, *base, "--run_dir", seg_run, "--init_from", tmp_path / "cls",
                     "--init_part", "encoder", "--model.arch_kwargs", scse, "--model.lr", 0.0)  # fmt: skip
    assert json.loads((seg_run / "metrics.json").read_text())["init_part"] == "encoder"
    theirs = load_checkpoint(cls_run / "best.ckpt")["state_dict"]
    ours = load_checkpoint(seg_run / "last.ckpt")["state_dict"]
    assert any("attention" in k for k in ours) and not any("attention" in k for k in theirs)
    enc = [
        k for k in ours if k.startswith("net.net.encoder.") and "running" not in k and "num_batches" not in k
    ]
    assert enc and all(torch.equal(ours[k], theirs[k]) for k in enc)  # lr 0: the encoder is the classifier's
    head = "net.net.segmentation_head.0.weight"
    assert not torch.equal(ours[head], theirs[head])  # the rest is this run's own initialisation
    with pytest.raises(SteelError, match=r"its full net \(Unet/tu-test_resnet.r160_in1k\) does not fit"):
        from steel.module import SteelModule
        from steel.stages import load_init

        load_init(SteelModule(arch="FPN", encoder=TINY_ENCODER), cls_run / "best.ckpt", "full")


def test_stage_recipes_chain_to_recipes_whose_weights_fit() -> None:
    """Every recipe with init_from names the default run dir of another recipe (runs/<stem>), and the part it
    copies exists there with the same shapes: the same net for full, the same encoder for encoder."""
    stages = 0
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        recipe = yaml.safe_load(path.read_text())
        if not recipe.get("init_from"):
            continue
        stages += 1
        earlier = EXPERIMENTS / f"{Path(recipe['init_from']).name}.yaml"
        assert recipe["init_from"] == f"runs/{earlier.stem}" and earlier.is_file(), path
        before = yaml.safe_load(earlier.read_text())["model"]
        keys = ("encoder", "in_channels")
        if recipe.get("init_part", "full") == "full":
            keys += ("arch", "arch_kwargs")
        assert all(recipe["model"].get(k) == before.get(k) for k in keys), (path, keys)
        assert recipe["data"]["folds_csv"] == yaml.safe_load(earlier.read_text())["data"]["folds_csv"]
    assert stages >= 3


# ---- training tricks -----------------------------------------------------------------------------------
def _batch(b: int = 4, h: int = 32, w: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(b, 4, h, w, generator=g) > 0.8).to(torch.uint8)
    return {
        "image": torch.rand(b, 1, h, w, generator=g),
        "mask": mask,
        "label": mask.flatten(2).amax(2).float(),
    }


def test_mixup_mixes_images_and_masks() -> None:
    """The net sees lam x + (1 - lam) x[perm]; the loss is that of the mixed masks and labels (BCE: exactly)."""
    from steel.module import SteelModule

    torch.manual_seed(0)
    model = SteelModule(encoder=TINY_ENCODER, seg_loss={"name": "bce", "pos_weight": [2.0, 2.0, 1.0, 1.5]},
                        cls_loss_weight=0.5, mixup_alpha=0.4, mixup_p=1.0)  # fmt: skip
    model.eval()  # the same outputs for the same input (no dropout, BatchNorm running statistics)
    batch, lam, perm = _batch(), 0.7, torch.tensor([2, 0, 3, 1])
    seen = []
    model.net.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    loss, parts = model.mixed_losses(batch, lam, perm)
    x = batch["image"]
    torch.testing.assert_close(seen[0], lam * x + (1 - lam) * x[perm])
    out = model.net(seen[0])
    mixed_mask = lam * batch["mask"].float() + (1 - lam) * batch["mask"][perm].float()
    mixed_label = lam * batch["label"] + (1 - lam) * batch["label"][perm]
    expected, _ = model._losses(out, {"mask": mixed_mask, "label": mixed_label})
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"seg_loss", "cls_loss", "bce_loss"}
    # training_step draws lam ~ Beta(0.4, 0.4) and a permutation when mixup is on, and not when it is off
    model.log = model.log_dict = lambda *a, **k: None
    seen.clear()
    model.training_step(batch, 0)
    assert not torch.equal(seen[-1], x)
    model.hparams.mixup_alpha = 0.0
    model.training_step(batch, 0)
    assert torch.equal(seen[-1], x)
    with pytest.raises(SteelError, match="mixup_alpha -1"):
        SteelModule(encoder=TINY_ENCODER, mixup_alpha=-1)


def test_label_smoothing_moves_the_label_targets() -> None:
    """cls_loss smooth_factor 0.1: the loss is smallest at probability 0.9 for a present class, 0.1 for an
    absent one (gradient zero there), instead of at 1 and 0."""
    from steel.losses import build_cls_loss

    loss = build_cls_loss({"name": "bce", "smooth_factor": 0.1})
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    logits = torch.logit(torch.tensor([[0.9, 0.1, 0.9, 0.1]])).requires_grad_()
    loss(logits, labels).backward()
    assert logits.grad.abs().max() < 1e-6
    plain = build_cls_loss({"name": "bce"})
    grad = torch.autograd.grad(plain(logits, labels), logits)[0]
    assert (grad[0, [0, 2]] < 0).all() and (grad[0, [1, 3]] > 0).all()  # plain BCE still pushes to 1 / 0
    for bad in (0.5, -0.1):
        with pytest.raises(SteelError, match=f"cls_loss smooth_factor {bad}: must be in"):
            build_cls_loss({"name": "bce", "smooth_factor": bad})


def test_scse_decoder_attention() -> None:
    from segmentation_models_pytorch.base.modules import SCSEModule

    from steel.model import TwoHeadNet

    kw = {"decoder_channels": [32, 32, 16, 16, 16]}  # SCSE squeezes channels / 16: at least 16 a block
    plain = TwoHeadNet("Unet", TINY_ENCODER, arch_kwargs=kw)
    net = TwoHeadNet("Unet", TINY_ENCODER, arch_kwargs={**kw, "decoder_attention_type": "scse"}).eval()
    assert not any(isinstance(m, SCSEModule) for m in plain.modules())
    assert sum(isinstance(m, SCSEModule) for m in net.modules()) == 10  # 2 per decoder block
    out = net(torch.rand(2, 1, 64, 160))
    assert out["mask"].shape == (2, 4, 64, 160) and out["label"].shape == (2, 4)
    with pytest.raises(SteelError, match="cannot build FPN with encoder .*decoder_attention_type"):
        TwoHeadNet("FPN", TINY_ENCODER, arch_kwargs={"decoder_attention_type": "scse"})


def _strip(h: int, w: int, black: slice) -> tuple[np.ndarray, np.ndarray]:
    """A grey image (h, w) of steel (value 100 + column % 100) with black columns ``black`` (values 0-9), and
    masks (4, h, w) whose class 1 marks the columns of x % 7 == 0 (to check that they move with the image)."""
    cols = np.arange(w)
    image = np.broadcast_to(100 + cols % 100, (h, w)).astype(np.uint8).copy()
    image[:, black] = (cols[black] % 10).astype(np.uint8)
    masks = np.zeros((4, h, w), np.uint8)
    masks[0][:, cols % 7 == 0] = 1
    return image, masks


@pytest.mark.parametrize("side", ["left", "right", "all"])
def test_crops_avoid_the_black_margin(side: str) -> None:
    """9th place: a random crop that is mostly below intensity 10 moves to the end of the image that shows steel
    (the right end when neither does); without the option such crops happen."""
    from steel.augment import DefectAwareCrop, mostly_black

    h, w, cw = 32, 320, 64
    black = {"left": slice(0, 200), "right": slice(120, None), "all": slice(0, None)}[side]
    image, masks = _strip(h, w, black)
    rng = np.random.default_rng(0)
    crops = [DefectAwareCrop(h, cw, avoid_black=on) for on in (False, True)]
    found = [[c(image, masks, rng) for _ in range(200)] for c in crops]
    assert any(mostly_black(im) for im, _ in found[0])  # plain random crops land on the margin
    starts = []
    for im, m in found[1]:  # windows are views: their column is their offset in the image
        x0 = (im.__array_interface__["data"][0] - image.__array_interface__["data"][0]) // image.strides[1]
        assert np.array_equal(im, image[:, x0 : x0 + cw]) and np.array_equal(m, masks[:, :, x0 : x0 + cw])
        assert x0 == w - cw if side == "all" else not mostly_black(im)
        starts.append(x0)
    steel_end = {"left": w - cw, "right": 0, "all": w - cw}[side]
    assert starts.count(steel_end) > 10  # the crops that were black moved there (a random start rarely is)


def test_black_margin_crops_on_synthetic_images(small_synth: tuple[Path, Path]) -> None:
    """Through the data module (avoid_black_crop): no training crop of a synthetic image with a margin is
    mostly black."""
    from steel.augment import mostly_black
    from steel.data import SteelDataModule

    data, folds = small_synth
    dm = SteelDataModule(str(data), str(folds), 0, batch_size=4, num_workers=0, train_crop=[32, 32],
                         augment="none", avoid_black_crop=True)  # fmt: skip
    dm.setup("fit")
    for avoid in (False, True):
        dm.train_set.transform.crop.avoid_black = avoid
        crops = [dm.train_set[i]["image"][0].numpy() for _ in range(5) for i in range(len(dm.train_set))]
        assert any(mostly_black(c) for c in crops) != avoid, avoid


def test_module_builds_the_net_it_is_told() -> None:
    """pooling and mask_prior of SteelModule reach the net (the tiny recipe's max pooling, a mask prior)."""
    from steel.module import SteelModule

    model = SteelModule(encoder=TINY_ENCODER, pooling="max", mask_prior=0.01)
    pools = [type(m).__name__ for m in model.net.net.classification_head.modules()]
    assert "AdaptiveMaxPool2d" in pools and "AdaptiveAvgPool2d" not in pools
    head = model.net.net.segmentation_head[0]
    torch.testing.assert_close(torch.sigmoid(head.bias), torch.full_like(head.bias, 0.01))
