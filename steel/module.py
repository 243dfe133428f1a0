"""SteelModule: the LightningModule (train/val/test/predict steps, losses, optimisers, logging).

Validation metric (``val/dice``, what ``best.ckpt`` maximises): competition Dice on full native-resolution
validation images. Probabilities come from ``steel.ensemble`` exactly as the OOF store's (resize to
``input_size`` or pad, sigmoid, resize the probabilities back); the decision is ``steel.postprocess``'s with
the thresholds ``pixel_threshold`` / ``label_threshold`` (0.5, compared with ``>=``) and ``gating``:
  hard (default): mask probability >= pixel, class kept only if its class probability >= label
  soft:           mask probability x class probability >= pixel, and the same label gate (4th place gating)
  none:           mask head alone (no label gate)
No min-area post-processing (that is tuned later on OOF predictions by ``steel sweep``). So val/dice is the
OOF dice of this fold under these fixed thresholds. The LightningCLI and run-dir callbacks: ``steel.train_cli``.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MultilabelAUROC

from steel import N_CLASSES
from steel.ensemble import to_model_size, to_native, views_to_probs
from steel.errors import SteelError
from steel.losses import build_cls_loss, build_seg_loss
from steel.metrics import CompetitionDice
from steel.model import TwoHeadNet
from steel.postprocess import Params, gating_params, postprocess_torch
from steel.rundir import SPLIT_KEY, split_of

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
        cls_loss: label loss config, e.g. {name: bce, pos_weight: null, smooth_factor: 0.05} (label smoothing:
            targets 0/1 become 0.05/0.95, 7th place).
        cls_loss_weight: weight of the label loss in the total (0 = segmentation only).
        seg_loss_weight: weight of the mask loss in the total (0 = classification only: a multilabel classifier
            whose encoder can start segmentation runs, ``steel fit --init_from RUN --init_part encoder``).
        mixup_alpha: mixup of training batches (7th place): with probability ``mixup_p`` a batch's images are
            mixed with a shuffled copy, x = lam x + (1 - lam) x[perm], lam ~ Beta(alpha, alpha), and the loss is
            lam L(masks, labels) + (1 - lam) L(masks[perm], labels[perm]) (for BCE exactly the loss of the mixed
            masks and labels). 0 = off.
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
        seg_loss_weight: float = 1.0,
        mixup_alpha: float = 0.0,
        mixup_p: float = 0.5,
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
        gating_params(
            gating, pixel_threshold, label_threshold
        )  # SteelError for a bad rule, now not at validation
        if mixup_alpha < 0 or not 0.0 <= mixup_p <= 1.0:
            raise SteelError(f"mixup_alpha {mixup_alpha}, mixup_p {mixup_p}: need alpha >= 0 and p in [0, 1]")
        if seg_loss_weight < 0 or cls_loss_weight < 0 or seg_loss_weight + cls_loss_weight == 0:
            raise SteelError(
                f"seg_loss_weight {seg_loss_weight}, cls_loss_weight {cls_loss_weight}: need >= 0, not both 0"
            )
        self.net = TwoHeadNet(
            arch, encoder, encoder_weights, in_channels, N_CLASSES, dropout, pooling, arch_kwargs, mask_prior
        )
        self.seg_loss = build_seg_loss(seg_loss)
        self.cls_loss = build_cls_loss(cls_loss)
        self.val_dice = CompetitionDice()
        self.val_auc = MultilabelAUROC(num_labels=N_CLASSES, average=None)
        self.val_pos = SumMetric()  # positives per class, to average AUC over classes that have both kinds
        self.val_n = SumMetric()
        self._examples: list[dict[str, np.ndarray]] = []
        self._split: tuple[tuple[str, int], dict[str, Any]] | None = None

    # ---- inference (steel.ensemble: the one path from nets to native-size probabilities) ---------------
    @property
    def input_size(self) -> tuple[int, int] | None:
        """Model input (h, w) at validation/inference; None = native size (padded to multiples of 32)."""
        s = self.hparams.get("input_size")
        return (int(s[0]), int(s[1])) if s is not None else None

    def native_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Native-size grey images (B, 1, H, W) in [0, 1] -> (mask probs (B, 4, H, W), class probs (B, 4),
        logits {"mask": (B, 4, H, W) resized like the probabilities, "label": (B, 4)} for the losses):
        ``steel.ensemble``'s one-fold, no-TTA path, the one the OOF store uses."""
        h, w = x.shape[-2], x.shape[-1]
        size = list(self.input_size) if self.input_size is not None else None
        out = self.net(to_model_size(x, size))
        probs, cls = views_to_probs([out["mask"]], [out["label"]], ["none"], h, w, size)
        return probs, cls, {"mask": to_native(out["mask"], h, w, size), "label": out["label"]}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Native-size grey images (B, 1, H, W) in [0, 1] -> (mask probs (B, 4, H, W), class probs (B, 4))."""
        probs, cls, _ = self.native_outputs(x)
        return probs, cls

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask probabilities (B, 4, H, W), label probabilities (B, 4)) of native-size images (B, 1, H, W)."""
        return self(x)

    @property
    def rule(self) -> Params:
        """The val/dice decision rule (``steel.postprocess.gating_params`` of gating and the thresholds)."""
        hp = self.hparams
        return gating_params(hp.gating, hp.pixel_threshold, hp.label_threshold)

    def decide(self, probs: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """Boolean masks (B, 4, H, W) of the val/dice rule, applied by ``steel.postprocess`` like a submission's."""
        rule = self.rule
        arr = {k: torch.as_tensor(v, device=probs.device) for k, v in rule.arrays().items()}
        return postprocess_torch(
            probs,
            cls,
            arr["label"],
            arr["pixel"],
            arr["min_area"],
            arr["min_component"],
            rule.mode == "soft",
            1,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the fold and split hash of the training data (``steel.rundir.check_fold`` reads them)."""
        dm = self.trainer.datamodule
        hp = getattr(dm, "hparams", None) or {}
        if "folds_csv" in hp and "fold" in hp:
            key = (str(hp["folds_csv"]), int(hp["fold"]))
            if self._split is None or self._split[0] != key:  # hashed once per fit, not per checkpoint
                self._split = (key, split_of(hp["folds_csv"], hp["fold"]))
            checkpoint[SPLIT_KEY] = dict(self._split[1])

    # ---- steps ------------------------------------------------------------------------------------------
    def _losses(
        self, out: dict[str, torch.Tensor], batch: dict
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        seg, parts = self.seg_loss(out["mask"], batch["mask"])
        cls = self.cls_loss(out["label"], batch["label"])
        total = self.hparams.seg_loss_weight * seg + self.hparams.cls_loss_weight * cls
        return total, {"seg_loss": seg, "cls_loss": cls, **{f"{k}_loss": v for k, v in parts.items()}}

    def mixed_losses(
        self, batch: dict, lam: float, perm: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mixup step: the net on lam x + (1 - lam) x[perm] (x (B, 1, H, W)), losses lam L(batch) +
        (1 - lam) L(batch[perm]) -> (total, parts) like ``_losses``."""
        x = batch["image"]
        out = self.net(x.mul(lam).add_(x[perm], alpha=1.0 - lam))
        a, parts_a = self._losses(out, batch)
        b, parts_b = self._losses(out, {"mask": batch["mask"][perm], "label": batch["label"][perm]})
        parts = {k: lam * v + (1.0 - lam) * parts_b[k] for k, v in parts_a.items()}
        return lam * a + (1.0 - lam) * b, parts

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        if hp.mixup_alpha > 0 and float(torch.rand(())) < hp.mixup_p:
            lam = float(torch.distributions.Beta(hp.mixup_alpha, hp.mixup_alpha).sample())
            perm = torch.randperm(batch["image"].shape[0], device=batch["image"].device)
            loss, parts = self.mixed_losses(batch, lam, perm)
        else:
            loss, parts = self._losses(self.net(batch["image"]), batch)
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
        probs, cls, logits = self.native_outputs(batch["image"])
        loss, parts = self._losses(logits, batch)
        bs = batch["image"].shape[0]
        self.log(f"{prefix}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log_dict({f"{prefix}/{k}": v for k, v in parts.items()}, batch_size=bs, sync_dist=True)
        pred = self.decide(probs, cls)
        self.val_dice.update(pred, batch["mask"])
        labels = batch["label"].int()
        self.val_auc.update(cls, labels)
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
    try:
        model = SteelModule.load_from_checkpoint(ckpt_path, map_location=map_location, encoder_weights=None)
    except Exception:
        from steel.checkpoints import load_checkpoint

        load_checkpoint(ckpt_path)  # SteelError naming the file if it is not a readable checkpoint
        raise
    return model.eval()
