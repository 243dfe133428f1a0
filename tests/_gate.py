"""Test probe for launch tests (``--trainer.callbacks+=tests._gate.Gate``): holds a fold at a known point, so a
test can stop it there whatever the machine's speed.

At the start of epoch 1 of a fold whose run dir has ``gate/fold-K`` (made by the test), the fold writes
``gate/fold-K.waiting`` (its epoch-0 last.ckpt is on disk by then) and waits until the gate file is removed or
the process gets SIGTERM (Lightning then stops it at the end of the step). Without the gate file it does nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl


class Gate(pl.Callback):
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fold_dir = Path(trainer.default_root_dir)
        gate = fold_dir.parent / "gate" / fold_dir.name
        if trainer.current_epoch != 1 or not gate.exists():
            return
        gate.with_name(gate.name + ".waiting").touch()
        while gate.exists() and not trainer.received_sigterm:
            time.sleep(0.1)
