"""The LightningCLI behind ``steel fit|validate|test|predict --config`` and its run-directory callbacks.

Run directory (``--run_dir``, default runs/<config stem>/fold-<K>), every file written atomically:
  best.ckpt      the epoch with the highest val/dice (written after a validation)
  last.ckpt      written at the end of every training epoch (resume point; a killed fold loses at most one epoch)
  config.yaml    the resolved config (start of fit)
  progress.json  after each validation during fit
  metrics.json   end of fit: "complete": true, fold, split_hash, folds_csv, best val/dice and its epoch
  swa.ckpt       with ``--average_top_k K``: weights of the K best epochs averaged
  validate.json / test.json after ``steel validate`` / ``steel test``; W&B offline files in wandb/
The last training epoch is always validated (whatever ``check_val_every_n_epoch``), so every finished fit
leaves best.ckpt, last.ckpt and metrics.json (``steel.rundir.fold_done``). Every checkpoint records the fold
and the split hash of its folds CSV (``SteelModule.on_save_checkpoint``); resuming a checkpoint of another
split is refused.

Stages (``steel.stages``): ``--init_from CKPT_OR_RUN_DIR`` starts the fit from the weights (``--init_part full``
or ``encoder``) of the same fold of an earlier run, refused for another fold or split; optimiser, scheduler and
epochs start fresh. ``--monitor val/cls_auc`` picks best.ckpt by the label head's AUC (a classification-only
run, ``model.seg_loss_weight 0``); metrics.json then also says ``monitor`` and ``best_score``.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger

from steel import N_CLASSES
from steel.blend import average_checkpoints
from steel.data import SteelDataModule
from steel.errors import SteelError
from steel.io import atomic_path, write_json, write_text
from steel.module import SteelModule
from steel.rundir import METRICS_FILE, SPLIT_KEY, fold_done, split_of
from steel.stages import INIT_PARTS, check_init, init_checkpoint, load_init


# ---- run directory callbacks ----------------------------------------------------------------------------
class TopKCheckpoint(ModelCheckpoint):
    """Keeps the weights of the k best epochs in <run_dir>/topk/ for weight averaging. Its state key names its
    directory so that it can live beside the best/last ModelCheckpoint (Lightning wants unique keys)."""

    @property
    def state_key(self) -> str:
        return "ModelCheckpoint" + repr({"monitor": self.monitor, "mode": self.mode, "dirpath": "topk"})


class ValidateLastEpoch(Callback):
    """Validates the last training epoch whatever ``check_val_every_n_epoch`` is, so that every fit ends with a
    val/dice for its final weights and a best.ckpt. The last epoch is the one that reaches ``max_epochs`` or
    (with ``max_steps``) the one whose batches reach it; for it the trainer validates every epoch."""

    def __init__(self) -> None:
        self.saved: int | None = None

    def _is_last(self, trainer: pl.Trainer) -> bool:
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            if trainer.current_epoch + 1 >= trainer.max_epochs:
                return True
        if trainer.max_steps is not None and trainer.max_steps > 0:
            batches = trainer.num_training_batches
            if math.isfinite(batches):
                steps = math.ceil(int(batches) / max(1, trainer.accumulate_grad_batches))
                return trainer.global_step + steps >= trainer.max_steps
        return False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = trainer.check_val_every_n_epoch
        if every is not None and every > 1 and self._is_last(trainer):
            self.saved, trainer.check_val_every_n_epoch = every, 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.saved is not None:
            trainer.check_val_every_n_epoch, self.saved = self.saved, None


class RunFiles(Callback):
    """Writes progress.json after each fit validation and metrics.json at the end of fit (global rank 0)."""

    def __init__(self, run_dir: str | Path, fold: int, monitor: str = "val/dice") -> None:
        self.run_dir, self.fold, self.monitor = Path(run_dir), fold, monitor
        self.best: float | None = None  # val/dice of the best epoch (by ``monitor``)
        self.best_score: float | None = None  # its ``monitor`` value
        self.best_epoch = -1
        self.best_per_class: list[float] | None = None
        self.split: dict[str, Any] | None = None
        self.init: dict[str, Any] | None = None  # {"init_from": checkpoint, "init_part": part} of a stage

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            hp = trainer.datamodule.hparams
            self.split = split_of(hp.folds_csv, hp.fold)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Refuse to resume (``--ckpt_path``) weights trained on another fold or split."""
        old, new = checkpoint.get(SPLIT_KEY), self.split
        if trainer.state.fn != "fit" or not old or not new:
            return
        if (old.get("fold"), old.get("split_hash")) != (new["fold"], new["split_hash"]):
            raise SteelError(
                f"--ckpt_path: the checkpoint was trained as fold {old.get('fold')} of split {old.get('split_hash')} "
                f"({old.get('folds_csv')}), this fit is fold {new['fold']} of split {new['split_hash']} ({new['folds_csv']})"
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = trainer.callback_metrics
        if trainer.sanity_checking or trainer.state.fn != "fit" or not {"val/dice", self.monitor} <= set(m):
            return
        dice, score = float(m["val/dice"]), float(m[self.monitor])
        score = score if math.isfinite(score) else -math.inf
        if self.best_score is None or score > self.best_score:
            self.best, self.best_score, self.best_epoch = dice, score, trainer.current_epoch
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
            "complete": True,
            "fold": self.fold,
            **{k: v for k, v in (self.split or {}).items() if k != "fold"},
            "best_val_dice": self.best,
            "best_epoch": self.best_epoch,
            "val_dice_per_class": self.best_per_class,
            "wandb_run_id": run_id,
            **(
                {"monitor": self.monitor, "best_score": self.best_score} if self.monitor != "val/dice" else {}
            ),
            **(self.init or {}),
        }

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            write_json(self.run_dir / METRICS_FILE, self.metrics(trainer))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_score": self.best_score, "best_epoch": self.best_epoch,
                "best_per_class": self.best_per_class}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.best_per_class = (
            state_dict["best"],
            state_dict["best_epoch"],
            state_dict["best_per_class"],
        )
        self.best_score = state_dict.get("best_score", self.best)  # checkpoints before --monitor: val/dice


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
        parser.add_argument(
            "--init_from",
            type=str | None,
            default=None,
            help="start from the weights of this checkpoint, or of fold-<data.fold>/best.ckpt of this earlier run "
            "dir (same fold of the same split, else refused); fresh optimiser, scheduler and epochs",
        )
        parser.add_argument(
            "--init_part",
            type=Literal["full", "encoder"],
            default="full",
            help=f"what --init_from copies: {' or '.join(INIT_PARTS)} (e.g. a classifier run's encoder)",
        )
        parser.add_argument(
            "--monitor",
            type=Literal["val/dice", "val/cls_auc"],
            default="val/dice",
            help="metric that best.ckpt maximises (val/cls_auc for a classification-only run)",
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
        # the dirs this command creates, deepest first: steel.cli removes them again if it fails at once
        self.created_dirs = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
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
                monitor=cfg.monitor,
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
            monitor=cfg.monitor,
            mode="max",
            save_top_k=1,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        )
        # last.ckpt at the end of every training epoch, after that epoch's validation (so it holds the best and
        # top-k callbacks' current state: resume, and the top-k scores that steel blend reads). Not best's
        # save_last: in this Lightning it writes last.ckpt only when a new best is saved, and only at validation
        last = ModelCheckpoint(
            dirpath=run_dir,
            filename="last",
            monitor=None,
            save_top_k=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
        callbacks += [best, last, ValidateLastEpoch()]
        self.run_files = RunFiles(run_dir, cfg.data.fold, cfg.monitor)
        callbacks.append(self.run_files)
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    # -- around the trainer methods
    def before_fit(self) -> None:
        """``--init_from``: the fold's weights of the earlier stage, checked against this fold and split."""
        cfg = self.config.fit
        if not cfg.init_from:
            return
        from steel.folds import split_hash

        hp = self.datamodule.hparams
        ckpt = init_checkpoint(cfg.init_from, int(hp.fold))
        check_init(ckpt, int(hp.fold), split_hash(hp.folds_csv))
        n = load_init(self.model, ckpt, cfg.init_part)
        self.run_files.init = {"init_from": str(ckpt), "init_part": cfg.init_part}
        if self.trainer.is_global_zero:
            print(f"init_from: {n} {cfg.init_part} tensors from {ckpt} (fold {hp.fold})", flush=True)

    def after_fit(self) -> None:
        trainer, run_dir = self.trainer, Path(self.config.fit.run_dir)
        if trainer.is_global_zero and not trainer.fast_dev_run and not fold_done(run_dir):
            missing = [n for n in ("best.ckpt", "last.ckpt", METRICS_FILE) if not (run_dir / n).is_file()]
            raise SteelError(
                f"{run_dir}: fit ended without {', '.join(missing) or 'a complete metrics.json'} "
                f"(was it stopped, or is validation disabled with limit_val_batches 0?)"
            )
        if self.topk_checkpoint is None or not self.topk_checkpoint.best_k_models:
            return
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
        swa_dice, swa_score = float(result[0]["val/dice"]), float(result[0][self.config.fit.monitor])
        if trainer.is_global_zero:
            metrics = self.run_files.metrics(trainer)
            metrics.update({"swa_val_dice": swa_dice, "swa_members": len(paths), "best_source": "epoch"})
            best_score = self.run_files.best_score
            if best_score is None or swa_score > best_score:
                with atomic_path(best, ".ckpt") as tmp:
                    shutil.copyfile(run_dir / "swa.ckpt", tmp)
                metrics.update(
                    {
                        "best_val_dice": swa_dice,
                        **({"best_score": swa_score} if "best_score" in metrics else {}),
                        "best_source": "swa",
                        "val_dice_per_class": [
                            float(trainer.callback_metrics[f"val/dice_{c}"]) for c in range(1, N_CLASSES + 1)
                        ],
                    }
                )
            write_json(run_dir / METRICS_FILE, metrics)

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
