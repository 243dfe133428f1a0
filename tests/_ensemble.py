"""Tiny run dirs for the blend/export/predict tests: 3 fold checkpoints of random-weight tiny nets (no training),
folds.csv, config.yaml with data.data_dir, an OOF store (stride 1) and a hand-written thresholds.json; the blend of
two of them exported (6 nets), and a one-net ensemble dir exported (for tests of plumbing: a 6-net .pt2 takes ~4x
longer to export and to load)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

TINY_NET = {"arch": "Unet", "encoder": "tu-test_resnet.r160_in1k", "encoder_weights": None, "dropout": 0.0,
            "arch_kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}}  # fmt: skip
_CACHE: dict[str, Path] = {}
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch on one thread while a module runs: the 2 test cores are shared, and oversubscribed intra-op threads
    make the tiny convolutions several times slower (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def save_checkpoint(path: Path, seed: int, input_size: list[int] | None = None, split: dict | None = None,
                    **net: object) -> Path:  # fmt: skip
    """A SteelModule checkpoint (hyper_parameters + state_dict) loadable by steel.module.load_model; ``split``
    (``steel.rundir.split_of(folds_csv, fold)``) is recorded as ``steel fit`` records it."""
    import pytorch_lightning as pl

    from steel.module import SteelModule
    from steel.rundir import SPLIT_KEY

    torch.manual_seed(seed)
    model = SteelModule(**{**TINY_NET, **net}, input_size=input_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": pl.__version__, "epoch": 0, "global_step": 0}  # fmt: skip
    if split is not None:
        ckpt[SPLIT_KEY] = split
    torch.save(ckpt, path)
    return path


def write_thresholds(run: Path, pixel: float = 0.52, label: float = 0.49, min_area: float = 40, min_component: float = 8,
                     mode: str = "hard") -> None:  # fmt: skip
    from steel.postprocess import Params

    Params.uniform(label, pixel, min_area, min_component, mode).save(
        run / "thresholds.json", stride=1, trials=0
    )


def write_scaled_thresholds(run: Path) -> None:
    """write_thresholds' values in scaled mode, each class with its own scale (class 1's 0 is hard mode's)."""
    from steel.postprocess import ClassParams, Params

    classes = tuple(ClassParams(0.49, 0.52, 40, 8, scale) for scale in (0.0, 0.5, 1.0, 1.5))
    Params(classes, "scaled").save(run / "thresholds.json", stride=1, trials=0)


def make_run(root: Path, name: str, synth_dir: Path, folds_csv: Path, seed: int, input_size: list[int] | None = None,
             oof: bool = True, **thr: object) -> Path:  # fmt: skip
    """root/name: a 3-fold run dir of random tiny nets, with its OOF store and thresholds.json."""
    import yaml

    from steel.oof import build_oof
    from steel.rundir import split_of

    run = root / name
    for k in range(3):
        save_checkpoint(run / f"fold-{k}" / "best.ckpt", seed * 10 + k, input_size, split_of(folds_csv, k))
    shutil.copyfile(folds_csv, run / "folds.csv")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"data_dir": str(synth_dir)}}))
    if oof:
        build_oof(run, stride=1, batch_size=20, device="cpu")
    write_thresholds(run, **thr)
    return run


def tiny_runs(tmp_path_factory, synth_dir: Path, folds_csv: Path) -> dict[str, Path]:
    """Run dirs shared by the test modules of one session: 'a' (native size) and 'b' (input 64x352)."""
    if "a" not in _CACHE:
        root = tmp_path_factory.mktemp("runs")
        _CACHE["a"] = make_run(root, "a", synth_dir, folds_csv, seed=1)
        _CACHE["b"] = make_run(root, "b", synth_dir, folds_csv, seed=2, input_size=[64, 352])
    return {k: _CACHE[k] for k in ("a", "b")}


def exported_ensemble(tmp_path_factory, synth_dir: Path, folds_csv: Path) -> tuple[Path, Path]:
    """(ensemble dir = mean blend of runs a and b with thresholds.json (scaled mode), its .pt2 export), once a
    session."""
    if "ens" not in _CACHE:
        from steel.blend import blend
        from steel.export import export

        runs = tiny_runs(tmp_path_factory, synth_dir, folds_csv)
        root = tmp_path_factory.mktemp("ensemble")
        ens = blend([runs["a"], runs["b"]], root / "ens")
        write_scaled_thresholds(ens)
        _CACHE["ens"], _CACHE["pt"] = ens, export(ens, root / "ens.pt2", check=False)
    return _CACHE["ens"], _CACHE["pt"]


def small_exported(tmp_path_factory) -> tuple[Path, Path]:
    """(ensemble dir of one member = one random tiny net at input 64x352 for 64x320 images, thresholds.json in
    scaled mode, its .pt2 export), once a session: for the tests where what is exported does not matter."""
    if "small" not in _CACHE:
        import yaml

        from steel.export import export

        root = tmp_path_factory.mktemp("small_ensemble")
        ckpt = save_checkpoint(root / "net" / "best.ckpt", seed=5, input_size=[64, 352])
        ens = root / "ens"
        ens.mkdir()
        spec = {
            "members": [{"run_dir": str(ckpt.parent), "checkpoints": [str(ckpt)]}],
            "image_size": [64, 320],
        }
        (ens / "ensemble.yaml").write_text(yaml.safe_dump(spec))
        write_scaled_thresholds(ens)
        _CACHE["small"], _CACHE["small_pt"] = ens, export(ens, root / "ens.pt2", check=False)
    return _CACHE["small"], _CACHE["small_pt"]
