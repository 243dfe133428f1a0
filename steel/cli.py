"""`steel` entry point. Subcommands are modules exposing ``add_arguments`` and ``main``; ``fit``,
``validate``, ``test`` and ``predict --config`` go to LightningCLI."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

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
    "export": ("steel.export", "export a run or ensemble as one TorchScript/ONNX file"),
    "predict": ("steel.predict", "images -> submission.csv (with --config: LightningCLI predict)"),
    "score": ("steel.metrics", "competition mean Dice of a submission"),
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


def main(argv: list[str] | None = None) -> int:
    """Run the ``steel`` command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    if not argv or argv[0] not in COMMANDS:
        _parser().parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    try:
        if _is_lightning(argv):
            from steel.train_cli import cli_main

            cli_main(argv)
            return 0
        module = importlib.import_module(COMMANDS[name][0])
        parser = argparse.ArgumentParser(prog=f"steel {name}", description=COMMANDS[name][1])
        module.add_arguments(parser)
        args = parser.parse_args(argv[1:])
        return int(module.main(args) or 0)
    except SteelError as e:
        print(f"steel {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"steel {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
