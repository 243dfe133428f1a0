"""Training throughput: the data loader against raw cv2 decoding on the same cores, and the Lightning training
step against a plain torch loop on the same model and batch (ratios measured in the same run).

    python benchmarks/bench_train.py [--data-dir DIR] [--n-images 240] [--workers 2] [--crop 256 512]
                                     [--models Unet:resnet18] [--batch 4] [--steps 10] [--precision 32-true]
                                     [--channels-last off|on|both] [--device auto|cpu|cuda]
                                     [--loader-only]
    python benchmarks/bench_train.py --cuda   # GPU preset: Unet/FPN efficientnet-b3, batch 16, bf16, NHWC on/off

Data: Kaggle-size synthetic images (``steel synth``, 256x1600) unless ``--data-dir`` names a Kaggle-layout dir.
1. loader: ``SteelDataModule`` train loader (``--workers`` processes: JPEG decode, RLE runs decoded for the crop
   window only, crop, light augmentations, masks packed into bits, uint8 batches collated into reused shared
   memory, ``steel.collate``) vs ``cv2.imread(GRAYSCALE)``
   of the same files on a thread pool of the same size, measured alternately ``--repeats`` times (best kept);
   also the loader plus ``prepare_batch`` (float images, unpacked masks) on the device, which on a CPU-only
   box shares the same cores, and the CPU time each side spends per image (Linux: this process, its threads
   and its worker processes, from /proc): on a busy machine the wall-clock ratio drifts with the other jobs,
   the CPU-time ratio is what an idle box with these cores would show.
2. step: ``SteelModule`` fitted by a ``pl.Trainer`` (no logger/checkpoints/progress bar) on one fixed batch
   served from memory vs a hand-written loop (forward, the same losses, backward, optimizer step) on the same
   batch. Both take the batch as the train loader hands it over (uint8 images, packed masks; pinned on CUDA)
   and each step move it to the device and ``prepare_batch`` it there (Lightning through the data module's
   ``on_after_batch_transfer``, as ``steel fit`` does), so the ratio is Lightning's own overhead; both count
   images/s after ``--warmup`` steps, alternating ``--rounds`` times (best kept), for each
   model and memory layout (channels_last), with the GPU memory peak. Device: CUDA if available, else CPU.
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


def ensure_data(
    data_dir: str | None, n: int, tmp: Path, height: int = 256, width: int = 1600
) -> tuple[Path, Path]:
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
                "--height",
                str(height),
                "--width",
                str(width),
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


def cpu_seconds() -> float:
    """CPU time (user + system, s) of this process and its live children (DataLoader workers), from /proc;
    NaN off Linux."""
    if not os.path.isdir("/proc/self"):
        return float("nan")
    me, ticks, total = os.getpid(), os.sysconf("SC_CLK_TCK"), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(pid) == me or int(fields[1]) == me:  # fields[1]: parent pid; [11], [12]: utime, stime
            total += int(fields[11]) + int(fields[12])
    return total / ticks


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


def train_loader(data_dir: Path, folds: Path, workers: int, batch: int, crop: list[int]):
    """The SteelDataModule train loader of fold 0 (light augmentations, persistent workers)."""
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
    return dm.train_dataloader()


def loader_pass(loader, device: str | None = None) -> tuple[float, int]:
    """(images/s, images) of one epoch of ``loader``; with ``device``, each batch also moved there and made
    what the model takes (``prepare_batch``: float images, unpacked masks; on the CPU with one torch thread,
    as the loader workers hold the other cores)."""
    from steel.data import prepare_batch

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    t, n = time.perf_counter(), 0
    for b in loader:
        if device is not None:
            b = prepare_batch(
                {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
            )
        n += b["image"].shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t)
    torch.set_num_threads(threads)
    return rate, n


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
    return next(iter(dm.train_dataloader()))  # as the loader hands it over: uint8 images, packed masks


def to_model(batch: dict, device: str) -> dict:
    """One step's data path: the loader's batch to ``device`` (non-blocking) and ``prepare_batch`` there."""
    from steel.data import prepare_batch

    return prepare_batch(
        {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    )


class FixedBatches(torch.utils.data.Dataset):
    """``n`` copies of one collated batch (batch_size=None loader): the step benchmark excludes data loading."""

    def __init__(self, batch: dict, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return dict(self.batch)  # prepare_batch replaces entries of the dict it is given


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def bench_plain(
    model_args: dict,
    batch: dict,
    steps: int,
    warmup: int,
    device: str,
    precision: str,
    channels_last: bool = False,
) -> tuple[float, float]:
    """(images/s, CPU s per image) of a hand-written loop: forward, SteelModule's losses, backward, AdamW step."""
    from steel.module import SteelModule

    torch.manual_seed(0)
    fmt = _memory_format(channels_last)
    module = SteelModule(**model_args).to(device, memory_format=fmt).train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    batch = {**batch, "image": batch["image"].contiguous(memory_format=fmt)}  # .to(device) keeps the layout
    amp = precision.startswith("16") or precision.startswith("bf16")
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    scaler = torch.amp.GradScaler(enabled=precision.startswith("16") and device == "cuda")
    n = batch["image"].shape[0]
    for i in range(warmup + steps):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            t, cpu = time.perf_counter(), time.process_time()
        b = to_model(batch, device)
        with torch.autocast(device_type=device, dtype=dtype, enabled=amp):
            out = module.net(b["image"])
            loss, _ = module._losses(out, b)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * n / (time.perf_counter() - t), (time.process_time() - cpu) / (steps * n)


def bench_lightning(
    model_args: dict,
    batch: dict,
    steps: int,
    warmup: int,
    device: str,
    precision: str,
    channels_last: bool = False,
) -> tuple[float, float]:
    """(images/s, CPU s per image) of pl.Trainer.fit on the same batch (timed from the ``warmup``-th step to
    the end of training)."""
    import pytorch_lightning as pl

    from steel.module import SteelModule

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, batch_idx):
            if batch_idx == warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                self.t, self.cpu = time.perf_counter(), time.process_time()

        def on_train_end(self, trainer, pl_module):
            if device == "cuda":
                torch.cuda.synchronize()
            self.elapsed, self.cpu = time.perf_counter() - self.t, time.process_time() - self.cpu

    torch.manual_seed(0)
    fmt = _memory_format(channels_last)
    module = SteelModule(**model_args, optimizer="adamw", lr=1e-4, scheduler="none", log_images=0)
    module = module.to(memory_format=fmt)
    batch = {**batch, "image": batch["image"].contiguous(memory_format=fmt)}  # .to(device) keeps the layout
    from steel.data import prepare_batch

    class FixedData(pl.LightningDataModule):
        """``FixedBatches`` as a data module whose batches are prepared on the device, as SteelDataModule's."""

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(
                FixedBatches(batch, warmup + steps), batch_size=None, num_workers=0
            )

        def on_after_batch_transfer(self, b: dict, dataloader_idx: int) -> dict:
            return prepare_batch(b)

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
    trainer.fit(module, datamodule=FixedData())
    n = steps * batch["image"].shape[0]
    return n / clock.elapsed, clock.cpu / n


def bench_steps(args: argparse.Namespace, batch: dict, device: str) -> None:
    """Plain loop vs Lightning for each ``--models`` entry and channels_last setting; prints a table."""
    layouts = {"off": [False], "on": [True], "both": [False, True]}[args.channels_last]
    print(
        f"\n[step] batch {args.batch} x 1x{args.crop[0]}x{args.crop[1]}, {args.precision}, {args.steps} timed steps"
        f" after {args.warmup} warm-up, best of {args.rounds} interleaved rounds"
    )
    # on a CPU the process's CPU time per image is a second measure that the machine's other jobs hardly move
    print(
        "| model | channels_last | plain img/s | Lightning img/s | Lightning/plain | by CPU time | GPU peak GiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for spec in args.models.split(","):
        arch, encoder = spec.split(":")
        model_args = {"arch": arch, "encoder": encoder, "encoder_weights": None}
        for cl in layouts:
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            plain = light = 0.0
            plain_cpu = light_cpu = float("inf")
            for _ in range(args.rounds):  # interleaved, best of rounds: the machine's load drifts
                run = (model_args, batch, args.steps, args.warmup, device, args.precision, cl)
                rate, cpu = bench_plain(*run)
                plain, plain_cpu = max(plain, rate), min(plain_cpu, cpu)
                rate, cpu = bench_lightning(*run)
                light, light_cpu = max(light, rate), min(light_cpu, cpu)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            by_cpu = f"{plain_cpu / light_cpu:.3f}" if device == "cpu" else "-"
            print(
                f"| {arch}/{encoder} | {'on' if cl else 'off'} | {plain:.1f} | {light:.1f} | {light / plain:.3f} | {by_cpu} | {peak:.2f} |",
                flush=True,
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n-images", type=int, default=240, help="3/4 of them are the loader's epoch")
    p.add_argument("--height", type=int, default=256, help="synthetic image height (no --data-dir)")
    p.add_argument("--width", type=int, default=1600, help="synthetic image width (no --data-dir)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--crop", type=int, nargs=2, default=[256, 512])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="Unet:resnet18", help="comma-separated ARCH:ENCODER (smp names)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="plain/Lightning measured alternately this many times (best kept)",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loader-only", action="store_true", help="measure the loader only (no training steps)")
    p.add_argument(
        "--precision",
        default="32-true",
        help="Lightning precision; the plain loop uses the matching autocast",
    )
    p.add_argument("--channels-last", choices=("off", "on", "both"), default="off")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--cuda",
        action="store_true",
        help="GPU preset: Unet/FPN efficientnet-b3, batch 16, bf16-mixed, channels_last off and on, "
        "8 loader workers (explicit options given after it still win)",
    )
    argv = sys.argv[1:]
    if "--cuda" in argv:  # preset first, so options the user wrote win
        preset = ["--device", "cuda", "--models", "Unet:efficientnet-b3,FPN:efficientnet-b3", "--batch", "16",
                  "--precision", "bf16-mixed", "--channels-last", "both", "--workers", "8", "--steps", "20"]  # fmt: skip
        argv = preset + argv
    args = p.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_train: --device cuda but no CUDA device here; nothing measured")
        sys.exit(1)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"cores {os.cpu_count()}, workers {args.workers}, load {os.getloadavg()[0]:.1f}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        data_dir, folds = ensure_data(args.data_dir, args.n_images, Path(tmp), args.height, args.width)
        from steel.data import SteelDataModule

        dm = SteelDataModule(str(data_dir), str(folds), 0, num_workers=0)
        dm.setup("fit")
        paths = [data_dir / "train_images" / i for i in dm.train_set.ids]
        shape = dm.train_table.attrs["shape"]
        loader_ = train_loader(data_dir, folds, args.workers, args.batch * 2, args.crop)
        loader_pass(loader_)  # starts the workers
        decode = loader = prepared = 0.0
        cpu_decode = cpu_loader = 0.0  # CPU seconds over all passes
        for _ in range(args.repeats):  # interleaved, best of repeats: the machine's load drifts
            c0 = cpu_seconds()
            decode = max(decode, bench_decode(paths, args.workers, 1))
            c1 = cpu_seconds()
            loader = max(loader, loader_pass(loader_)[0])
            c2 = cpu_seconds()
            rate, n = loader_pass(loader_, device)
            prepared = max(prepared, rate)
            cpu_decode, cpu_loader = cpu_decode + c1 - c0, cpu_loader + c2 - c1
        ms_decode = cpu_decode / (args.repeats * len(paths)) * 1e3
        ms_loader = cpu_loader / (args.repeats * n) * 1e3
        print(
            f"\n[loader] {n} train images of {shape[0]}x{shape[1]}, crop {args.crop[0]}x{args.crop[1]}, batch {args.batch * 2},"
            f" {args.workers} workers, best of {args.repeats} interleaved passes, load {os.getloadavg()[0]:.1f}"
        )
        print(f"  raw cv2.imread(GRAYSCALE), {args.workers} threads : {decode:9.1f} images/s")
        print(f"  SteelDataModule train loader          : {loader:9.1f} images/s")
        print(f"  ratio loader / raw decode             : {loader / decode:9.3f}")
        print(
            f"  loader + prepare_batch on {device:<4}       : {prepared:9.1f} images/s ({prepared / decode:.3f})"
        )
        print(
            f"  CPU ms per image: raw decode {ms_decode:.3f}, loader {ms_loader:.3f} (main + workers);"
            f" ratio {ms_decode / ms_loader if ms_loader > 0 else float('nan'):.3f}"  # clock ticks: 10 ms
        )

        if args.loader_only:
            return
        batch = make_batch(data_dir, folds, args.batch, args.crop)
        if device == "cuda":  # as the loader hands it over with pin_memory
            batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
        bench_steps(args, batch, device)


if __name__ == "__main__":
    main()
