"""Training throughput: the data loader against raw cv2 decoding on the same cores, and the Lightning training
step against a plain torch loop on the same model and batch (ratios measured in the same run).

    python benchmarks/bench_train.py [--data-dir DIR] [--n-images 96] [--workers 2] [--crop 256 512]
                                     [--arch Unet] [--encoder resnet18] [--batch 4] [--steps 12] [--precision 32-true]

Data: Kaggle-size synthetic images (``steel synth``, 256x1600) unless ``--data-dir`` names a Kaggle-layout dir.
1. loader: ``SteelDataModule`` train loader (``--workers`` processes, RLE decode, crop, light augmentations,
   float conversion, collation) vs ``cv2.imread(GRAYSCALE)`` of the same files on a thread pool of the same size.
2. step: ``SteelModule`` fitted by a ``pl.Trainer`` (no logger/checkpoints/progress bar) on one fixed batch
   served from memory vs a hand-written loop (forward, the same losses, backward, optimizer step) on the same
   batch; both count images/s after ``--warmup`` steps. Device: CUDA if available, else CPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import torch


def ensure_data(data_dir: str | None, n: int, tmp: Path) -> tuple[Path, Path]:
    """(data dir, folds csv): the given dir, or fresh 256x1600 synthetic data in ``tmp``."""
    if data_dir:
        out = Path(data_dir)
    else:
        out = tmp / "data"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "steel.cli",
                "synth",
                str(out),
                "--n-train",
                str(n),
                "--n-test",
                "1",
                "--seed",
                "0",
            ],
            check=True,
            capture_output=True,
        )
    folds = tmp / "folds.csv"
    subprocess.run(
        [sys.executable, "-m", "steel.cli", "folds", str(out), "--n-folds", "4", "--out", str(folds)],
        check=True,
        capture_output=True,
    )
    return out, folds


def bench_decode(paths: list[Path], workers: int, repeats: int) -> float:
    """images/s of cv2.imread(GRAYSCALE) over ``paths`` on a pool of ``workers`` threads (cv2 releases the GIL)."""

    def read(p: Path):
        return cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)

    best = 0.0
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(read, paths))
            best = max(best, len(paths) / (time.perf_counter() - t))
    return best


def bench_loader(
    data_dir: Path, folds: Path, workers: int, batch: int, crop: list[int], repeats: int
) -> tuple[float, int]:
    """(images/s, images per epoch) of the SteelDataModule train loader (fold 0 held out)."""
    from steel.data import SteelDataModule

    dm = SteelDataModule(
        str(data_dir),
        str(folds),
        0,
        batch_size=batch,
        num_workers=workers,
        train_crop=crop,
        augment="light",
        pin_memory=torch.cuda.is_available(),
        persistent_workers=True,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    best = 0.0
    for i in range(repeats + 1):  # first pass starts the workers
        t = time.perf_counter()
        n = sum(b["image"].shape[0] for b in loader)
        if i:
            best = max(best, n / (time.perf_counter() - t))
    return best, n


def make_batch(data_dir: Path, folds: Path, batch: int, crop: list[int]) -> dict:
    from steel.data import SteelDataModule

    dm = SteelDataModule(
        str(data_dir),
        str(folds),
        0,
        batch_size=batch,
        num_workers=0,
        train_crop=crop,
        augment="none",
        pin_memory=False,
    )
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


class FixedBatches(torch.utils.data.Dataset):
    """``n`` copies of one collated batch (batch_size=None loader): the step benchmark excludes data loading."""

    def __init__(self, batch: dict, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.batch


def bench_plain(model_args: dict, batch: dict, steps: int, warmup: int, device: str, precision: str) -> float:
    """images/s of a hand-written loop: forward, SteelModule's losses, backward, AdamW step."""
    from steel.module import SteelModule

    torch.manual_seed(0)
    module = SteelModule(**model_args).to(device).train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    b = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    amp = precision.startswith("16") or precision.startswith("bf16")
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    scaler = torch.amp.GradScaler(enabled=precision.startswith("16") and device == "cuda")
    n = b["image"].shape[0]
    for i in range(warmup + steps):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
        with torch.autocast(device_type=device, dtype=dtype, enabled=amp):
            out = module.net(b["image"])
            loss, _ = module._losses(out, b)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * n / (time.perf_counter() - t)


def bench_lightning(
    model_args: dict, batch: dict, steps: int, warmup: int, device: str, precision: str
) -> float:
    """images/s of pl.Trainer.fit on the same batch (timed from the ``warmup``-th step to the last)."""
    import pytorch_lightning as pl

    from steel.module import SteelModule

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, batch_idx):
            if batch_idx == warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                self.t = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            if device == "cuda":
                torch.cuda.synchronize()
            self.elapsed = time.perf_counter() - self.t

    torch.manual_seed(0)
    module = SteelModule(**model_args, optimizer="adamw", lr=1e-4, scheduler="none", log_images=0)
    loader = torch.utils.data.DataLoader(FixedBatches(batch, warmup + steps), batch_size=None, num_workers=0)
    clock = Clock()
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(module, train_dataloaders=loader)
    return steps * batch["image"].shape[0] / clock.elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n-images", type=int, default=96)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--crop", type=int, nargs=2, default=[256, 512])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--arch", default="Unet")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--precision",
        default="32-true",
        help="Lightning precision; the plain loop uses the matching autocast",
    )
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, cores {os.cpu_count()}, workers {args.workers}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        data_dir, folds = ensure_data(args.data_dir, args.n_images, Path(tmp))
        from steel.data import SteelDataModule

        dm = SteelDataModule(str(data_dir), str(folds), 0, num_workers=0)
        dm.setup("fit")
        paths = [data_dir / "train_images" / i for i in dm.train_set.ids]
        shape = dm.train_table.attrs["shape"]
        decode = bench_decode(paths, args.workers, args.repeats)
        loader, n = bench_loader(data_dir, folds, args.workers, args.batch * 2, args.crop, args.repeats)
        print(
            f"\n[loader] {n} train images of {shape[0]}x{shape[1]}, crop {args.crop[0]}x{args.crop[1]}, {args.workers} workers"
        )
        print(f"  raw cv2.imread(GRAYSCALE), {args.workers} threads : {decode:9.1f} images/s")
        print(f"  SteelDataModule train loader          : {loader:9.1f} images/s")
        print(f"  ratio loader / raw decode             : {loader / decode:9.3f}")

        batch = make_batch(data_dir, folds, args.batch, args.crop)
        model_args = {"arch": args.arch, "encoder": args.encoder, "encoder_weights": None}
        plain = bench_plain(model_args, batch, args.steps, args.warmup, device, args.precision)
        light = bench_lightning(model_args, batch, args.steps, args.warmup, device, args.precision)
        print(
            f"\n[step] {args.arch}/{args.encoder}, batch {args.batch} x 1x{args.crop[0]}x{args.crop[1]}, {args.precision}, {args.steps} timed steps"
        )
        print(f"  plain torch loop     : {plain:9.2f} images/s")
        print(f"  Lightning fit        : {light:9.2f} images/s")
        print(f"  ratio Lightning/plain: {light / plain:9.3f}")


if __name__ == "__main__":
    main()
