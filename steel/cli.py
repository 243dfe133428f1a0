"""`steel` entry point. Subcommands are modules exposing ``add_arguments`` and ``main``; ``fit``,
``validate``, ``test`` and ``predict --config`` go to LightningCLI."""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from steel import __version__
from steel.errors import SteelError

COMMANDS = {
    "synth": ("steel.synth", "write Kaggle-layout synthetic data"),
    "folds": ("steel.folds", "stratified K-fold assignment CSV"),
    "fit": (None, "train one fold (LightningCLI; --config experiments/NAME.yaml)"),
    "validate": (None, "validate a checkpoint (LightningCLI)"),
    "test": (None, "test a checkpoint (LightningCLI)"),
    "launch": ("steel.launch", "run many folds on local GPUs/CPU or SLURM, with resume"),
    "oof": ("steel.oof", "out-of-fold predictions of a finished run"),
    "sweep": ("steel.sweep", "Optuna threshold search on OOF predictions"),
    "blend": ("steel.blend", "blend runs into an ensemble (its OOF and manifest)"),
    "export": ("steel.export", "export a run or ensemble as one torch.export (.pt2) or ONNX file"),
    "predict": ("steel.predict", "images -> submission.csv (with --config: LightningCLI predict)"),
    "score": ("steel.metrics", "competition mean Dice of a submission"),
    "pseudo": ("steel.pseudo", "pseudo-label images where classifier and masks agree confidently"),
    "advval": ("steel.advval", "adversarial validation: how test-like is each train image"),
    "inspect": ("steel.inspection", "class activation maps and the OOF error gallery (PNG, W&B)"),
    "demo": ("steel.demo", "the whole chain on synthetic data"),
}
LIGHTNING = {"fit", "validate", "test", "predict"}


def _is_lightning(argv: list[str]) -> bool:
    if argv[0] in ("fit", "validate", "test"):
        return True
    return argv[0] == "predict" and any(
        a in ("-c", "--print_config") or a.startswith(("--config", "--print_config")) for a in argv[1:]
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="steel", description="Severstal steel defect segmentation experiment suite"
    )
    p.add_argument("--version", action="version", version=f"steel {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def one_line(message: str) -> str:
    """A user error as one line: the last line of a traceback text (a SteelError raised in a DataLoader worker
    comes back wrapped with the worker's traceback); the first and last line of a long message (jsonargparse:
    'Parser key "trainer.logger":' ... 'Given value: X'); else the lines joined."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "error"
    if any(line.startswith("Traceback") or "Original Traceback" in line for line in lines):
        last = lines[-1]
        for prefix in ("steel.errors.SteelError: ", "SteelError: "):
            last = last.removeprefix(prefix)
        return last
    return " ".join(lines) if len(lines) <= 3 else f"{lines[0]} {lines[-1]}"


def _is_misconfiguration(e: Exception) -> bool:
    """Whether ``e`` is Lightning's error for a bad Trainer setting (e.g. --trainer.max_epochs -5)."""
    if "pytorch_lightning" not in sys.modules:
        return False
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    return isinstance(e, MisconfigurationException)


def _remove_unused_run_dir(cli: object) -> None:
    """After a fit that failed before its first training step: remove the run dir if this command made it and
    it holds no checkpoint (a W&B run begun in it is finished first), and the empty parents it made."""
    created = [Path(p) for p in getattr(cli, "created_dirs", None) or []]
    trainer = getattr(cli, "trainer", None)
    if not created or (trainer is not None and trainer.global_step > 0) or any(created[0].rglob("*.ckpt")):
        return
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish(exit_code=2)
    shutil.rmtree(created[0], ignore_errors=True)
    for parent in created[1:]:  # only while empty: a parallel fold may have put its own dir there meanwhile
        try:
            parent.rmdir()
        except OSError:
            break


def _check_configs(argv: list[str]) -> None:
    """SteelError naming a --config file that is a directory, missing, empty or not YAML (jsonargparse's own
    messages for these name no file)."""
    import yaml

    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        path = Path(value)
        if path.is_dir():
            raise SteelError(f"{path}: is a directory, expected a YAML config file")
        if not path.is_file():
            if value.endswith((".yaml", ".yml")):
                raise SteelError(f"{path}: config file not found")
            continue  # jsonargparse also takes inline YAML here
        text = path.read_text()
        if not text.strip():
            raise SteelError(f"{path}: empty config file")
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            raise SteelError(f"{path}: {where}not valid YAML ({getattr(e, 'problem', None) or e})") from None


def _lightning(argv: list[str]) -> None:
    """Run a LightningCLI subcommand. Config errors raise (no usage dump); a failure before training started
    removes the run dir it created."""
    from steel.train_cli import SteelCLI

    started: list[SteelCLI] = []

    class CLI(SteelCLI):
        def parse_arguments(self, parser: Any, args: Any) -> None:
            super().parse_arguments(parser, args)
            sub = self.config.get("subcommand")
            ckpt = str((self.config.get(sub) if sub else self.config).get("ckpt_path") or "")
            if (
                ckpt
                and ckpt not in ("last", "best", "hpc")
                and not ckpt.startswith("registry")
                and "://" not in ckpt
            ):
                from steel.checkpoints import load_checkpoint

                load_checkpoint(ckpt)  # a local checkpoint file is opened before LightningCLI reads it

        def before_instantiate_classes(self) -> None:
            started.append(self)
            super().before_instantiate_classes()

    _check_configs(argv)
    # None: LightningCLI reads sys.argv itself (no "args and sys.argv both given" warning)
    args = None if argv == sys.argv[1:] else argv
    ok = False
    try:
        CLI(args=args, parser_kwargs={"exit_on_error": False})
        ok = True
    except BaseException:
        if started:
            _remove_unused_run_dir(started[0])
        raise
    finally:
        _finish_wandb(0 if ok else 1)


def _finish_wandb(exit_code: int) -> None:
    """Finish the W&B run the command began, as a process's exit does (Lightning's WandbLogger leaves it open:
    a later fit in the same process would log into it, and its offline file would lack its last records)."""
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish(exit_code=exit_code)


def main(argv: list[str] | None = None) -> int:
    """Run the ``steel`` command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    if not argv:  # no command: the help, and a failing status (nothing was done)
        _parser().print_help()
        return 2
    if argv[0] not in COMMANDS:
        _parser().parse_args(argv)
        return 2
    name = argv[0]
    try:
        if _is_lightning(argv):
            _lightning(argv)
            return 0
        module = importlib.import_module(COMMANDS[name][0])
        parser = argparse.ArgumentParser(prog=f"steel {name}", description=COMMANDS[name][1])
        module.add_arguments(parser)
        args = parser.parse_args(argv[1:])
        return int(module.main(args) or 0)
    except (SteelError, argparse.ArgumentError) as e:  # ArgumentError: a config LightningCLI rejects
        hint = f" (see steel {name} --help)" if isinstance(e, argparse.ArgumentError) else ""
        error = f"{one_line(str(e))}{hint}"
    except Exception as e:
        if not _is_misconfiguration(e):
            raise
        error = one_line(str(e))
    except KeyboardInterrupt:
        print(f"steel {name}: interrupted", file=sys.stderr)
        return 130
    # the failed step's objects are gone now: collecting them closes its progress bars, so the error line
    # starts a line of its own instead of continuing a half-drawn bar
    gc.collect()
    print(f"steel {name}: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
