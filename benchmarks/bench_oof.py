"""OOF store write throughput and peak memory on a Kaggle-size run (model replaced by random probabilities).

    python benchmarks/bench_oof.py [--n-images 12568] [--stride 2] [--batch 32] [--dir /tmp/bench-oof]

Prints images/s of ``OOFWriter`` (quantise + stride + memory-mapped write of 4 full-resolution 256x1600
maps per image) against a baseline measured in the same run: the same arrays written with ``np.save`` of
each batch (no quantisation, no memmap), and the process's peak RSS against the size of the store.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from steel.oof import OOFStore, OOFWriter


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-images", type=int, default=12568)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--dir", default=None)
    a = p.parse_args()
    root = Path(a.dir or tempfile.mkdtemp(prefix="bench-oof-"))
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n, h, w = a.n_images, a.height, a.width
    ids = [f"{i:09x}.jpg" for i in range(n)]
    folds = np.arange(n) % 10
    # one batch of random maps reused (generation is not what is measured), shifted per batch
    probs = rng.random((a.batch, 4, h, w), dtype=np.float32)
    truth = (probs > 0.8).astype(np.uint8)
    cls = rng.random((a.batch, 4), dtype=np.float32)
    rss0 = rss_mb()
    t = time.perf_counter()
    with OOFWriter(root / "oof", ids, folds, h, w, a.stride) as wr:
        for s in range(0, n, a.batch):
            r = np.arange(s, min(n, s + a.batch))
            wr.write(r, cls[: len(r)], probs[: len(r)], truth[: len(r)])
    dt = time.perf_counter() - t
    rss1 = rss_mb()
    store = OOFStore(root)
    size_mb = (store.masks.nbytes + store.truth.nbytes + store.cls.nbytes) / 2**20
    assert len(store) == n and store.masks.shape == (n, 4, -(-h // a.stride), -(-w // a.stride))
    # baseline in the same run: np.save of every raw batch (float32, full resolution) for a subset
    m = min(n, 20 * a.batch)
    t = time.perf_counter()
    for s in range(0, m, a.batch):
        np.save(root / f"raw-{s}.npy", probs[: min(a.batch, m - s)])
    base = m / (time.perf_counter() - t)
    for f in root.glob("raw-*.npy"):
        f.unlink()
    print(f"{n} images of {h}x{w}, 4 classes, stride {a.stride}, batch {a.batch}")
    print(f"OOFWriter: {n / dt:8.1f} images/s ({dt:.1f} s), store {size_mb:,.0f} MiB on disk")
    print(f"baseline np.save of raw float32 batches: {base:8.1f} images/s -> ratio {n / dt / base:.2f}x")
    print(
        f"peak RSS: {rss1:,.0f} MiB (before writing {rss0:,.0f} MiB; the store is {size_mb / max(rss1, 1):.1f}x that)"
    )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
