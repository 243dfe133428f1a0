"""SteelModule (LightningModule) and the LightningCLI behind ``steel fit|validate|test|predict --config``.

Validation metric (``val/dice``, what ``best.ckpt`` maximises): competition Dice on full native-resolution
validation images, prediction = sigmoid(mask) > ``pixel_threshold`` (0.5), gated per ``gating``:
  hard (default): a class is predicted only where sigmoid(label) > ``label_threshold`` (0.5)
  soft:           sigmoid(mask) * sigmoid(label) > pixel_threshold (4th place soft gating)
  none:           mask head alone
No min-area post-processing (that is tuned later on OOF predictions by ``steel sweep``).

Run directory (``--run_dir``, default runs/<config stem>/fold-<K>): best.ckpt (max val/dice), last.ckpt,
config.yaml, progress.json (after each validation), metrics.json (end of fit), W&B offline files in wandb/,
swa.ckpt with ``--average_top_k K`` (weights of the K best epochs averaged), validate.json after ``steel validate``.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MultilabelAUROC

from steel import N_CLASSES
from steel.data import SteelDataModule
from steel.errors import SteelError
from steel.io import atomic_path, write_json, write_text
from steel.losses import build_cls_loss, build_seg_loss
from steel.metrics import CompetitionDice
from steel.model import TwoHeadNet, run_at_size, soft_gate

CLASS_COLOURS = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200]], np.uint8)


def _cosine_lambda(step: int, total: int, warmup: int, min_ratio: float, cosine: bool) -> float:
    """LR factor: linear warmup over ``warmup`` steps, then constant or cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class SteelModule(pl.LightningModule):
    """TwoHeadNet + losses + optimiser/scheduler + validation metrics.

    Args:
        arch, encoder, encoder_weights, in_channels, dropout, pooling, arch_kwargs, mask_prior: see
            ``steel.model.TwoHeadNet`` (pooling "max" suits small defects in the label head).
        seg_loss: mask loss config, e.g. {name: bce_dice, bce_weight: 0.75, dice_weight: 0.25, pos_weight: [2, 2, 1, 1.5]}.
        cls_loss: label loss config, e.g. {name: bce, pos_weight: null}.
        cls_loss_weight: weight of the label loss in the total (0 = segmentation only).
        optimizer: sgd (momentum, nesterov) | adam | adamw | radam.
        scheduler: none | cosine (per step, optional warmup_epochs) | warmup (linear warmup then constant) |
            warmup_cosine | plateau (ReduceLROnPlateau on val/dice).
        input_size: model input (H, W) at validation/inference (linked from data.val_size); None = native size.
        pixel_threshold, label_threshold, gating: the val/dice decision rule (module docstring).
        log_images: validation images (with predicted/true masks) logged per epoch (W&B / TensorBoard).
    """

    def __init__(
        self,
        arch: str = "Unet",
        encoder: str = "resnet18",
        encoder_weights: str | None = None,
        in_channels: int = 1,
        dropout: float = 0.2,
        pooling: Literal["avg", "max"] = "avg",
        arch_kwargs: dict[str, Any] | None = None,
        mask_prior: float | None = None,
        seg_loss: dict[str, Any] | None = None,
        cls_loss: dict[str, Any] | None = None,
        cls_loss_weight: float = 0.2,
        optimizer: Literal["sgd", "adam", "adamw", "radam"] = "adamw",
        lr: float = 3e-4,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        scheduler: Literal["none", "cosine", "warmup", "warmup_cosine", "plateau"] = "cosine",
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.01,
        plateau_patience: int = 3,
        plateau_factor: float = 0.5,
        input_size: list[int] | None = None,
        pixel_threshold: float = 0.5,
        label_threshold: float = 0.5,
        gating: Literal["none", "hard", "soft"] = "hard",
        log_images: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if input_size is not None and (
            len(input_size) != 2 or any(int(v) <= 0 or int(v) % 32 for v in input_size)
        ):
            raise SteelError(f"input_size {list(input_size)}: need [height, width], positive multiples of 32")
        self.net = TwoHeadNet(
            arch, encoder, encoder_weights, in_channels, N_CLASSES, dropout, arch_kwargs=arch_kwargs
        )
        self.seg_loss = build_seg_loss(seg_loss)
        self.cls_loss = build_cls_loss(cls_loss)
        self.val_dice = CompetitionDice()
        self.val_auc = MultilabelAUROC(num_labels=N_CLASSES, average=None)
        self.val_pos = SumMetric()  # positives per class, to average AUC over classes that have both kinds
        self.val_n = SumMetric()
        self._examples: list[dict[str, np.ndarray]] = []

    # ---- inference --------------------------------------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, int] | None:
        """Model input (H, W) at inference; None = native size (padded to multiples of 32)."""
        s = self.hparams.get("input_size")
        return (int(s[0]), int(s[1])) if s is not None else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Native-size grey images (B, 1, H, W) in [0, 1] -> logits {"mask": (B, 4, H, W), "label": (B, 4)}."""
        return run_at_size(self.net, x, self.input_size)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask probabilities (B, 4, H, W), label probabilities (B, 4)) of native-size images (B, 1, H, W)."""
        out = self(x)
        return torch.sigmoid(out["mask"]).float(), torch.sigmoid(out["label"]).float()

    def decide(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Boolean masks (B, 4, H, W) of the val/dice decision rule (sigmoid > pixel_threshold, gated)."""
        hp = self.hparams
        if hp.gating == "soft":
            return soft_gate(out) > hp.pixel_threshold
        pred = torch.sigmoid(out["mask"]) > hp.pixel_threshold
        if hp.gating == "hard":
            pred = pred & (torch.sigmoid(out["label"]) > hp.label_threshold)[..., None, None]
        return pred

    # ---- steps ------------------------------------------------------------------------------------------
    def _losses(
        self, out: dict[str, torch.Tensor], batch: dict
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        seg, parts = self.seg_loss(out["mask"], batch["mask"])
        cls = self.cls_loss(out["label"], batch["label"])
        total = seg + self.hparams.cls_loss_weight * cls
        return total, {"seg_loss": seg, "cls_loss": cls, **{f"{k}_loss": v for k, v in parts.items()}}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.net(batch["image"])
        loss, parts = self._losses(out, batch)
        bs = batch["image"].shape[0]
        self.log(
            "train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs, sync_dist=True
        )
        self.log_dict(
            {f"train/{k}": v for k, v in parts.items()},
            on_step=False,
            on_epoch=True,
            batch_size=bs,
            sync_dist=True,
        )
        return loss

    def validation_step(self, batch: dict, batch_idx: int, prefix: str = "val") -> None:
        out = self(batch["image"])
        loss, parts = self._losses(out, batch)
        bs = batch["image"].shape[0]
        self.log(f"{prefix}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log_dict({f"{prefix}/{k}": v for k, v in parts.items()}, batch_size=bs, sync_dist=True)
        pred = self.decide(out)
        self.val_dice.update(pred, batch["mask"])
        labels = batch["label"].int()
        self.val_auc.update(torch.sigmoid(out["label"].float()), labels)
        self.val_pos.update(labels.sum(0).float())
        self.val_n.update(torch.tensor(float(bs), device=labels.device))
        if (
            batch_idx == 0
            and self.global_rank == 0
            and not self.trainer.sanity_checking
            and self.hparams.log_images > 0
        ):
            k = self.hparams.log_images
            self._examples = [
                {
                    "image": batch["image"][i, 0].float().cpu().numpy(),
                    "pred": pred[i].cpu().numpy(),
                    "true": batch["mask"][i].cpu().numpy().astype(bool),
                    "id": batch["image_id"][i],
                }
                for i in range(min(k, bs))
            ]

    def on_validation_epoch_end(self, prefix: str = "val") -> None:
        mean, per_class = self.val_dice.compute()
        self.log(f"{prefix}/dice", mean.float(), prog_bar=True, sync_dist=True)
        self.log_dict({f"{prefix}/dice_{c + 1}": v.float() for c, v in enumerate(per_class)}, sync_dist=True)
        auc = self.val_auc.compute()
        pos, n = self.val_pos.compute(), self.val_n.compute()
        valid = (pos > 0) & (pos < n)
        self.log(
            f"{prefix}/cls_auc",
            auc[valid].mean().float() if valid.any() else auc.new_tensor(float("nan")),
            sync_dist=True,
        )
        for metric in (self.val_dice, self.val_auc, self.val_pos, self.val_n):
            metric.reset()
        if self._examples:
            self._log_examples()
            self._examples = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Same as validation (on the validation fold), logged as test/*."""
        self.validation_step(batch, batch_idx, prefix="test")

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end(prefix="test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """{"image_id": list[str], "mask": (B, 4, H, W) float probabilities, "label": (B, 4) probabilities}."""
        mask, label = self.predict_proba(batch["image"])
        return {"image_id": list(batch["image_id"]), "mask": mask, "label": label}

    # ---- example images ---------------------------------------------------------------------------------
    def _log_examples(self) -> None:
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                labels = {0: "background", **{c: f"class {c}" for c in range(1, N_CLASSES + 1)}}

                def label_map(m: np.ndarray) -> np.ndarray:
                    return (m * np.arange(1, N_CLASSES + 1)[:, None, None]).max(0).astype(np.uint8)

                images = [(e["image"] * 255).clip(0, 255).astype(np.uint8) for e in self._examples]
                masks = [
                    {
                        "predictions": {"mask_data": label_map(e["pred"]), "class_labels": labels},
                        "ground_truth": {"mask_data": label_map(e["true"]), "class_labels": labels},
                    }
                    for e in self._examples
                ]
                logger.log_image(
                    "val/examples",
                    images,
                    step=self.global_step,
                    masks=masks,
                    caption=[e["id"] for e in self._examples],
                )
            elif isinstance(logger, TensorBoardLogger):
                grid = np.concatenate(
                    [overlay(e["image"], e["pred"], e["true"]) for e in self._examples], axis=0
                )
                logger.experiment.add_image("val/examples", grid, self.global_step, dataformats="HWC")

    # ---- optimisation -----------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(
                params, lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0, weight_decay=hp.weight_decay
            )
        else:
            cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[
                hp.optimizer
            ]
            opt = cls(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return opt
        if hp.scheduler == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="max", factor=hp.plateau_factor, patience=hp.plateau_patience
            )
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "monitor": "val/dice", "interval": "epoch"},
            }
        total = self.trainer.estimated_stepping_batches
        max_epochs = self.trainer.max_epochs
        if not math.isfinite(total) or not max_epochs or max_epochs < 0:
            return opt
        total = int(total)
        warmup_epochs = hp.warmup_epochs if hp.scheduler != "warmup_cosine" or hp.warmup_epochs > 0 else 1.0
        warmup = int(round(warmup_epochs * total / max_epochs))
        fn = partial(
            _cosine_lambda,
            total=total,
            warmup=warmup,
            min_ratio=hp.min_lr_ratio,
            cosine=hp.scheduler != "warmup",
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def overlay(image: np.ndarray, pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """RGB uint8 (2H, W, 3): the grey image with true masks (top) and predicted masks (bottom) tinted by class."""
    grey = np.repeat((image * 255).clip(0, 255).astype(np.uint8)[..., None], 3, -1)

    def tint(m: np.ndarray) -> np.ndarray:
        cls = (m * np.arange(1, N_CLASSES + 1)[:, None, None]).max(0)
        colour = CLASS_COLOURS[cls].astype(np.float32)
        a = (cls > 0)[..., None] * 0.45
        return (grey * (1 - a) + colour * a).astype(np.uint8)

    return np.concatenate([tint(true), tint(pred)], axis=0)


def load_model(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> SteelModule:
    """SteelModule from a checkpoint alone (hparams inside), in eval mode; pretrained weights are never downloaded."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise SteelError(f"{ckpt_path}: checkpoint not found")
    model = SteelModule.load_from_checkpoint(ckpt_path, map_location=map_location, encoder_weights=None)
    return model.eval()


def average_checkpoints(paths: list[str | Path], out: str | Path, template: str | Path | None = None) -> Path:
    """Average the float weights of checkpoints (12th place trick) into ``out`` (a full checkpoint: the
    template's, default the first path's, with the averaged state_dict)."""
    if not paths:
        raise SteelError("no checkpoints to average")
    states = [torch.load(p, map_location="cpu", weights_only=False)["state_dict"] for p in paths]
    ckpt = torch.load(template or paths[0], map_location="cpu", weights_only=False)
    avg = {}
    for key, value in states[0].items():
        if torch.is_floating_point(value):
            avg[key] = torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype)
        else:
            avg[key] = ckpt["state_dict"][key]
    ckpt["state_dict"] = avg
    with atomic_path(out, ".ckpt") as tmp:
        torch.save(ckpt, tmp)
    return Path(out)


# ---- run directory callbacks ----------------------------------------------------------------------------
class TopKCheckpoint(ModelCheckpoint):
    """Keeps the weights of the k best epochs in <run_dir>/topk/ for weight averaging. Its state key names its
    directory so that it can live beside the best/last ModelCheckpoint (Lightning wants unique keys)."""

    @property
    def state_key(self) -> str:
        return "ModelCheckpoint" + repr({"monitor": self.monitor, "mode": self.mode, "dirpath": "topk"})


class RunFiles(Callback):
    """Writes progress.json after each fit validation and metrics.json at the end of fit (global rank 0)."""

    def __init__(self, run_dir: str | Path, fold: int) -> None:
        self.run_dir, self.fold = Path(run_dir), fold
        self.best: float | None = None
        self.best_epoch = -1
        self.best_per_class: list[float] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or "val/dice" not in trainer.callback_metrics:
            return
        m = trainer.callback_metrics
        dice = float(m["val/dice"])
        if self.best is None or dice > self.best:
            self.best, self.best_epoch = dice, trainer.current_epoch
            self.best_per_class = [float(m[f"val/dice_{c}"]) for c in range(1, N_CLASSES + 1)]
        if trainer.is_global_zero:
            progress = {
                "epoch": trainer.current_epoch,
                "max_epochs": trainer.max_epochs,
                "val_dice": dice,
                "best_val_dice": self.best,
            }
            write_json(self.run_dir / "progress.json", progress)

    def metrics(self, trainer: pl.Trainer) -> dict[str, Any]:
        run_id = next((lg.version for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        return {
            "fold": self.fold,
            "best_val_dice": self.best,
            "best_epoch": self.best_epoch,
            "val_dice_per_class": self.best_per_class,
            "wandb_run_id": run_id,
        }

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            write_json(self.run_dir / "metrics.json", self.metrics(trainer))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "best_per_class": self.best_per_class}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.best_per_class = (
            state_dict["best"],
            state_dict["best_epoch"],
            state_dict["best_per_class"],
        )


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config as <run_dir>/config.yaml at the start of fit and logs it to W&B."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.already_saved:
            return
        if trainer.is_global_zero:
            text = self.parser.dump(self.config, skip_none=False)
            write_text(Path(self.config["run_dir"]) / "config.yaml", text)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.config.update({"cli": yaml.safe_load(text)}, allow_val_change=True)
        self.already_saved = True


# ---- LightningCLI ---------------------------------------------------------------------------------------
class SteelCLI(LightningCLI):
    """LightningCLI for SteelModule x SteelDataModule with the run-directory conventions of ``steel fit``."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", SaveRunConfig)
        kwargs.setdefault("seed_everything_default", 42)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(SteelModule, SteelDataModule, args=args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="run directory (default runs/<config stem>/fold-<data.fold>)",
        )
        parser.add_argument(
            "--average_top_k",
            type=int,
            default=0,
            help="keep the K best epochs and average their weights into swa.ckpt",
        )
        parser.add_argument(
            "--average_into_best",
            type=bool,
            default=False,
            help="validate swa.ckpt and copy it to best.ckpt if its val/dice is higher",
        )
        parser.link_arguments("data.val_size", "model.input_size")
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "pytorch_lightning.loggers.WandbLogger",
                    "init_args": {"project": "steel"},
                }
            }
        )

    # -- run dir, loggers
    def _experiment_name(self, cfg: Any) -> str:
        configs = cfg.get("config") or []
        return Path(str(configs[0])).stem if configs else "default"

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        name = self._experiment_name(cfg)
        fold = cfg.data.fold
        run_dir = Path(cfg.run_dir or f"runs/{name}/fold-{fold}")
        cfg.run_dir = str(run_dir)
        cfg.trainer.default_root_dir = str(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]
        for lg in loggers:
            if not hasattr(lg, "class_path"):
                continue
            args = lg.init_args
            if lg.class_path.endswith("WandbLogger"):
                if args.get("save_dir") in (None, "."):
                    args.save_dir = str(run_dir)
                args.name = args.get("name") or f"fold-{fold}"
                args.project = args.get("project") or "steel"
                if "group" in args:
                    args.group = args.get("group") or name
                else:  # older wandb/jsonargparse: wandb.init kwargs go through dict_kwargs
                    lg.dict_kwargs = {"group": name, **(lg.get("dict_kwargs") or {})}
            else:
                if lg.class_path.endswith("TensorBoardLogger") and not any(
                    importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")
                ):
                    raise SteelError(
                        "--trainer.logger TensorBoardLogger needs the tensorboard package (pip install tensorboard); CSVLogger needs nothing"
                    )
                if args.get("save_dir") in (None, "."):
                    args.save_dir = str(run_dir)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        cfg = self.config[self.subcommand]
        run_dir = Path(cfg.run_dir)
        user = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        callbacks = list(user) if isinstance(user, list) else [user]
        self.topk_checkpoint = None
        if self.subcommand == "fit" and cfg.average_top_k > 1:
            self.topk_checkpoint = TopKCheckpoint(
                dirpath=run_dir / "topk",
                filename="epoch{epoch:03d}",
                monitor="val/dice",
                mode="max",
                save_top_k=cfg.average_top_k,
                auto_insert_metric_name=False,
                save_weights_only=True,
                save_on_train_epoch_end=False,
            )
            callbacks.append(self.topk_checkpoint)  # before best/last: last.ckpt then holds its current state
        best = ModelCheckpoint(
            dirpath=run_dir,
            filename="best",
            monitor="val/dice",
            mode="max",
            save_top_k=1,
            enable_version_counter=False,
        )
        # last.ckpt after every validation (Lightning's save_last only writes when a new best is saved). All three
        # save in on_validation_end in this order, so last.ckpt holds the others' current state (resume, and the
        # top-k scores that steel blend reads)
        last = ModelCheckpoint(
            dirpath=run_dir,
            filename="last",
            monitor=None,
            save_top_k=1,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        )
        callbacks += [best, last]
        self.run_files = RunFiles(run_dir, cfg.data.fold)
        callbacks.append(self.run_files)
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    # -- after the trainer methods
    def after_fit(self) -> None:
        if self.topk_checkpoint is None or not self.topk_checkpoint.best_k_models:
            return
        trainer, run_dir = self.trainer, Path(self.config.fit.run_dir)
        best = run_dir / "best.ckpt"
        paths = [
            p for p, _ in sorted(self.topk_checkpoint.best_k_models.items(), key=lambda kv: -float(kv[1]))
        ]
        if trainer.is_global_zero:
            average_checkpoints(paths, run_dir / "swa.ckpt", template=best if best.is_file() else None)
        trainer.strategy.barrier()
        if not self.config.fit.average_into_best:
            return
        result = trainer.validate(
            self.model, datamodule=self.datamodule, ckpt_path=str(run_dir / "swa.ckpt"), verbose=False
        )
        swa_dice = float(result[0]["val/dice"])
        if trainer.is_global_zero:
            metrics = self.run_files.metrics(trainer)
            metrics.update({"swa_val_dice": swa_dice, "swa_members": len(paths), "best_source": "epoch"})
            if metrics["best_val_dice"] is None or swa_dice > metrics["best_val_dice"]:
                with atomic_path(best, ".ckpt") as tmp:
                    shutil.copyfile(run_dir / "swa.ckpt", tmp)
                metrics.update(
                    {
                        "best_val_dice": swa_dice,
                        "best_source": "swa",
                        "val_dice_per_class": [
                            float(trainer.callback_metrics[f"val/dice_{c}"]) for c in range(1, N_CLASSES + 1)
                        ],
                    }
                )
            write_json(run_dir / "metrics.json", metrics)

    def _write_eval(self, name: str) -> None:
        if self.trainer.is_global_zero:
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if torch.numel(v) == 1}
            write_json(Path(self.config[self.subcommand].run_dir) / f"{name}.json", metrics)

    def after_validate(self) -> None:
        self._write_eval("validate")

    def after_test(self) -> None:
        self._write_eval("test")


def cli_main(argv: list[str] | None = None) -> SteelCLI:
    """Run ``steel fit|validate|test|predict ...`` (argv without the leading ``steel``)."""
    import sys

    if argv is not None and list(argv) == sys.argv[1:]:
        argv = None  # the same words LightningCLI would read itself (avoids its "args and sys.argv" warning)
    return SteelCLI(args=argv)
