"""W&B lineage per stage: each stage is a run in the experiment's group with its job type, and logs its products
as artifacts that name their inputs, so the lineage reads checkpoints -> OOF -> thresholds -> exported file.

- train: every fold's own run (``steel launch`` sets WANDB_JOB_TYPE=train and WANDB_RUN_GROUP); when the fold is
  done, ``log_fold`` logs its best.ckpt as artifact ``<run>-fold-K`` (type model) from that same run id.
- oof, sweep, blend, export: ``log_oof``, ``log_sweep``, ``log_blend``, ``log_export`` at the end of the command.

A product is an artifact of file references (``file://`` URIs; md5 for files up to 64 MiB, larger ones by size
and mtime in a small fingerprint.json), built the same way by its producer and its consumers, so both get the
same digest. Online (WANDB_MODE=online) a consumer calls ``run.use_artifact`` and W&B draws the graph; offline
(the default) W&B cannot record a use (``use_artifact`` raises), so every stage run lists its inputs (name, type,
digest) in its config and in the metadata of each artifact it logs, and ``wandb sync`` uploads them as they are.
Nothing here is fatal: a W&B failure prints one warning line. WANDB_MODE=disabled turns it off.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CHECKSUM_MAX = 64 << 20  # bytes: larger files are fingerprinted by size and mtime instead of md5
OOF_FILES = (
    "index.csv",
    "meta.json",
    "cls.npy",
    "masks.npy",
    "truth.npy",
    "hist.npy",
)  # not the sweep's caches


def mode() -> str:
    """WANDB_MODE, offline unless set."""
    return os.environ.get("WANDB_MODE", "offline")


def _name(*parts: str) -> str:
    """An artifact name W&B accepts (letters, digits, - _ .)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts)).strip("-")


def experiment_of(run_dir: str | os.PathLike) -> str:
    """The W&B group of a run dir: the recipe ``steel launch`` recorded in its config.yaml, else the dir name."""
    run_dir = Path(run_dir)
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        exp = (cfg.get("launch") or {}).get("experiment")
        if exp:
            return Path(str(exp)).stem
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    return run_dir.resolve().name


@dataclass
class Product:
    """What a stage makes or reads: files under ``base``, named ``name`` with W&B artifact type ``type``."""

    name: str
    type: str
    base: Path
    files: list[Path] = field(default_factory=list)

    def exists(self) -> bool:
        return bool(self.files) and all(p.is_file() for p in self.files)

    def artifact(self, metadata: dict[str, Any] | None = None) -> Any:
        """A draft wandb.Artifact of references to the files (the same digest wherever it is built)."""
        import wandb

        art = wandb.Artifact(self.name, type=self.type, metadata=metadata)
        big = {}
        for p in self.files:
            rel = str(p.resolve().relative_to(self.base.resolve()))
            st = p.stat()
            if st.st_size <= CHECKSUM_MAX:
                art.add_reference(p.resolve().as_uri(), name=rel)
            else:
                art.add_reference(p.resolve().as_uri(), name=rel, checksum=False)
                big[rel] = [st.st_size, st.st_mtime_ns]
        if big:
            with art.new_file("fingerprint.json") as fh:
                json.dump(big, fh, sort_keys=True)
        return art


def fold_product(fold_dir: str | os.PathLike) -> Product:
    """fold-K/best.ckpt as artifact ``<run>-fold-K`` (type model)."""
    fold_dir = Path(fold_dir)
    return Product(
        _name(fold_dir.resolve().parent.name, fold_dir.name), "model", fold_dir, [fold_dir / "best.ckpt"]
    )


def oof_product(run_dir: str | os.PathLike) -> Product:
    """RUN_DIR/oof/ (the OOF store's files) as artifact ``<run>-oof``."""
    run_dir = Path(run_dir)
    files = [run_dir / "oof" / n for n in OOF_FILES if (run_dir / "oof" / n).is_file()]
    return Product(_name(run_dir.resolve().name, "oof"), "oof", run_dir, files)


def thresholds_product(run_dir: str | os.PathLike) -> Product:
    """RUN_DIR/thresholds.json as artifact ``<run>-thresholds``."""
    run_dir = Path(run_dir)
    return Product(
        _name(run_dir.resolve().name, "thresholds"), "thresholds", run_dir, [run_dir / "thresholds.json"]
    )


def ensemble_product(ens_dir: str | os.PathLike) -> Product:
    """An ensemble dir's ensemble.yaml (its members' checkpoints, TTA, weights) as artifact ``<dir>-ensemble``."""
    ens_dir = Path(ens_dir)
    return Product(
        _name(ens_dir.resolve().name, "ensemble"), "ensemble", ens_dir, [ens_dir / "ensemble.yaml"]
    )


def export_product(path: str | os.PathLike) -> Product:
    """An exported file as artifact ``<file name>`` (type exported-model)."""
    path = Path(path)
    return Product(_name(path.name), "exported-model", path.parent, [path])


def fold_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """RUN_DIR/fold-K dirs in fold order."""
    dirs = [p for p in Path(run_dir).glob("fold-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def log_stage(job_type: str, where: str | os.PathLike, group: str, name: str, inputs: list[Product],
              outputs: list[Product], config: dict[str, Any] | None = None,
              run_id: str | None = None) -> str | None:  # fmt: skip
    """One W&B run (``run_id``: continue that run, the live one when this process still has it open) that uses
    ``inputs`` and logs ``outputs``; files go to ``where``/wandb. Returns the run id, or None (W&B disabled, or a
    warning printed)."""
    if mode() == "disabled":
        return None
    try:
        import wandb

        ins = [(p, p.artifact()) for p in inputs if p.exists()]
        refs = [{"name": p.name, "type": p.type, "digest": a.digest} for p, a in ins]
        live = wandb.run if run_id and wandb.run is not None and wandb.run.id == run_id else None
        run = live or wandb.init(project=os.environ.get("WANDB_PROJECT", "steel"), group=group, job_type=job_type,
                         name=name, dir=str(where), mode=mode(), id=run_id, resume="allow" if run_id else None,
                         config={**(config or {}), "inputs": refs}, reinit="finish_previous",
                         settings=wandb.Settings(silent=True))  # fmt: skip
        if not run.offline:
            for _, art in ins:
                run.use_artifact(art)
        for p in outputs:
            if p.exists():
                run.log_artifact(p.artifact(metadata={"inputs": refs}))
        rid = run.id
        run.finish()
        return rid
    except Exception as e:  # noqa: BLE001 - lineage must never fail a stage
        print(f"steel: W&B {job_type} run not logged ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def log_fold(fold_dir: str | os.PathLike) -> str | None:
    """A finished fold: its best.ckpt as artifact, from the fold's own W&B run (metrics.json) when it had one."""
    fold_dir = Path(fold_dir)
    try:
        run_id = json.loads((fold_dir / "metrics.json").read_text()).get("wandb_run_id")
    except (OSError, ValueError, AttributeError):
        run_id = None
    group = experiment_of(fold_dir.parent)
    return log_stage("train", fold_dir, group, fold_dir.name, [], [fold_product(fold_dir)], run_id=run_id)


def log_oof(run_dir: str | os.PathLike) -> str | None:
    """``steel oof``: the folds' checkpoints in, the OOF store out."""
    run_dir = Path(run_dir)
    ins = [fold_product(d) for d in fold_dirs(run_dir)]
    return log_stage("oof", run_dir, experiment_of(run_dir), "oof", ins, [oof_product(run_dir)])


def log_sweep(run_dir: str | os.PathLike, run_id: str | None = None) -> str | None:
    """``steel sweep``: the OOF store in, thresholds.json out (into the sweep's own run ``run_id`` if it has one)."""
    run_dir = Path(run_dir)
    return log_stage("sweep", run_dir, experiment_of(run_dir), "sweep", [oof_product(run_dir)],
                     [thresholds_product(run_dir)], run_id=run_id)  # fmt: skip


def log_blend(out: str | os.PathLike, members: list[str | os.PathLike]) -> str | None:
    """``steel blend``: the members' checkpoints in, the blended OOF store and ensemble.yaml out."""
    out = Path(out)
    ins = [fold_product(d) for m in members for d in fold_dirs(m)]
    return log_stage("blend", out, out.resolve().name, "blend", ins, [oof_product(out), ensemble_product(out)],
                     config={"members": [str(Path(m).resolve()) for m in members]})  # fmt: skip


def log_export(src: str | os.PathLike, out: str | os.PathLike) -> str | None:
    """``steel export``: thresholds.json and the checkpoints (or ensemble.yaml) in, the exported file out."""
    src = Path(src)
    ins = [thresholds_product(src)]
    ins += (
        [ensemble_product(src)]
        if (src / "ensemble.yaml").is_file()
        else [fold_product(d) for d in fold_dirs(src)]
    )
    return log_stage("export", src, experiment_of(src), "export", ins, [export_product(out)])
