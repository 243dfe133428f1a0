"""RLE encode+decode throughput (masks/s) of steel.rle against a straightforward loop implementation.

python benchmarks/bench_rle.py [--n 200] [--height 256] [--width 1600]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from steel import rle
from steel.synth import make_image, sample_classes


def loop_encode(mask: np.ndarray) -> str:
    """Reference: walk the pixels one by one."""
    flat = mask.T.ravel()
    out, start = [], None
    for i, v in enumerate(flat):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out += [start + 1, i - start]
            start = None
    if start is not None:
        out += [start + 1, len(flat) - start]
    return " ".join(map(str, out))


def loop_decode(s: str, shape: tuple[int, int]) -> np.ndarray:
    """Reference: fill run by run."""
    flat = np.zeros(shape[0] * shape[1], np.uint8)
    v = [int(x) for x in s.split()]
    for start, length in zip(v[0::2], v[1::2]):
        for p in range(start - 1, start - 1 + length):
            flat[p] = 1
    return flat.reshape(shape[1], shape[0]).T


def rate(fn, masks, shape, repeat: int = 1) -> float:
    """Best-of-``repeat`` encode+decode rate in masks/s (best-of damps noise from other processes)."""
    best = 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        for m in masks:
            fn[1](fn[0](m), shape)
        best = max(best, len(masks) / (time.perf_counter() - t))
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=1600)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    shape = (a.height, a.width)
    masks = []
    while len(masks) < a.n:
        cls = sample_classes(rng)
        if cls:
            _, m = make_image(rng, cls, *shape)
            masks.append(m[cls[0] - 1])
    for m in masks[:10]:
        assert loop_encode(m) == rle.encode(m) and np.array_equal(
            loop_decode(rle.encode(m), shape), rle.decode(rle.encode(m), shape)
        )
    fast = rate((rle.encode, rle.decode), masks, shape, repeat=5)
    slow = rate((loop_encode, loop_decode), masks[: max(5, a.n // 10)], shape, repeat=3)
    print(
        f"masks {a.n} x {shape[0]}x{shape[1]} (synthetic defects, mean area {np.mean([m.sum() for m in masks]):.0f} px)"
    )
    print(f"steel.rle encode+decode: {fast:10.1f} masks/s")
    print(f"python loop baseline:    {slow:10.1f} masks/s")
    print(f"ratio: {fast / slow:.0f}x (goal >= 50x)")


if __name__ == "__main__":
    main()
