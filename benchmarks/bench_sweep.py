"""Threshold-sweep speed and exactness: OOF statistics, the exact grid search, brute force, TPE, `steel sweep`.

Builds a synthetic OOF store (default: the full Kaggle train set, 12,568 images, 256x1600 at stride 2 ->
4 x 128 x 800 per image; ~10 GB of masks + truth memmaps on disk; drawn at the strided size, so areas are
the strided ones), then prints:
  * statistics precompute (cold, streamed over the memmap, --workers threads; wall and CPU time) and the
    cache load time;
  * the exact search over the config's whole grid (every class: pixel x component x label x min-area), for
    the mean and the robust objective;
  * brute force (steel.postprocess on every mask + Dice) on --brute-images images for the exact best and
    --brute-sets random grid points: max |statistics - brute force|, and its time per parameter set
    extrapolated to the store, against which the exact search is compared (the baseline of this run);
  * --tpe-trials trials of `--search tpe` through Optuna's public API (study.optimize, TPESampler; in-memory
    storage): trials/s, each trial solving label and min-area exactly (new pixel thresholds are labelled
    on first use, so the first trials are the slow ones);
  * `steel sweep RUN` end to end (a new process: statistics, exact search, SQLite study, PNG; W&B offline)
    on a demo-size store (--demo-images images of 64x320 at stride 1, as `steel demo` makes).

    python benchmarks/bench_sweep.py                   # full size (needs ~11 GB of disk, minutes)
    python benchmarks/bench_sweep.py --n-images 2000   # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("WANDB_MODE", "disabled")

from steel.oof import OOFStore  # noqa: E402
from steel.oof_stats import load_or_compute_stats  # noqa: E402
from steel.postprocess import ClassParams, Params  # noqa: E402
from steel.sweep_config import load_config, sweep_grids  # noqa: E402
from steel.sweep_solver import Evaluator, brute_force_dice, grid_candidates, solve  # noqa: E402
from steel.sweep_study import TPEObjective, trial_seeded_tpe  # noqa: E402
from steel.synth import write_synthetic_oof  # noqa: E402


def cpu() -> float:
    """CPU seconds of this process and its threads so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=12568)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="statistics threads")
    ap.add_argument("--brute-images", type=int, default=200)
    ap.add_argument("--brute-sets", type=int, default=3)
    ap.add_argument("--tpe-trials", type=int, default=30, help="TPE trials (0: skip)")
    ap.add_argument("--demo-images", type=int, default=200, help="images of the `steel sweep` run (0: skip)")
    ap.add_argument("--config", default=None, help="sweep config (default: built-in = sweeps/default.yaml)")
    ap.add_argument("--dir", default=None, help="work dir (default: a temp dir, removed at the end)")
    ap.add_argument(
        "--keep", action="store_true", help="keep the work dir (a store of the same size is reused)"
    )
    args = ap.parse_args()

    import optuna

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    run = work / "run"
    out: list[str] = []

    def report(line: str) -> None:
        print(line, flush=True)
        out.append(line)

    try:
        report(
            f"load average at start: {' / '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)"
        )
        t = time.perf_counter()
        reuse = (run / "oof" / "meta.json").is_file() and len(OOFStore(run)) == args.n_images
        if not reuse:
            shutil.rmtree(run, ignore_errors=True)
            write_synthetic_oof(
                run / "oof", args.n_images, args.height, args.width, args.stride, seed=0, progress=True
            )
        store = OOFStore(run)
        n, h, w = len(store), *store.masks.shape[-2:]
        report(
            f"store: {n} images x 4 x {h} x {w} (stride {store.stride}), masks+truth {2 * store.masks.nbytes / 1e9:.1f} GB"
        )
        if not reuse:
            report(f"synthetic store written in {time.perf_counter() - t:.1f} s")

        cfg = load_config(args.config)
        pixel, comp = sweep_grids(cfg)
        for f in store.dir.glob("stats-*.npz"):
            f.unlink()
        t, c0 = time.perf_counter(), cpu()
        stats, path = load_or_compute_stats(store, pixel, comp, cfg["mode"], workers=args.workers)
        t_pre, c_pre = time.perf_counter() - t, cpu() - c0
        report(
            f"statistics precompute: {t_pre:.1f} s wall, {c_pre:.1f} s CPU, {args.workers} thread(s) "
            f"({t_pre / n * 1e3:.2f} ms/image; grid {len(pixel)} pixel x {len(comp)} component sizes; "
            f"cache {path.stat().st_size / 1e6:.0f} MB) [target <= 60 s for 12,568 images]"
        )
        t = time.perf_counter()
        stats, _ = load_or_compute_stats(store, pixel, comp, cfg["mode"], progress=False)
        report(f"cached statistics load: {time.perf_counter() - t:.2f} s")

        bound = max(float(d["min_component"].high) for d in cfg["dims"]) + 1
        ev = Evaluator(stats, store, bound, args.workers, base=[float(d["pixel"].low) for d in cfg["dims"]])
        for objective in ("mean", "robust"):
            t = time.perf_counter()
            cands = [grid_candidates(stats, c, cfg["dims"][c], ev.folds) for c in range(4)]
            sol = solve(cands, ev.folds, objective, 1.0)
            t_exact = time.perf_counter() - t
            points = len(cands[0].sums)
            report(
                f"exact search, objective {objective}: {t_exact:.2f} s for 4 classes x {points:,} grid points "
                f"(best {sol.value:.5f}) [target <= 2 s]"
            )
            if objective == "mean":
                best = Params(tuple(c.params(m) for c, m in zip(cands, sol.choice)), cfg["mode"])
                mean_points, t_mean = points, t_exact

        rng = np.random.default_rng(0)
        rows = np.sort(rng.choice(n, size=min(args.brute_images, n), replace=False))
        sets = [best] + [
            Params(
                tuple(
                    ClassParams(**{k: d.values()[int(rng.integers(d.n))] for k, d in dims.items()})
                    for dims in cfg["dims"]
                ),
                cfg["mode"],
            )  # fmt: skip
            for _ in range(args.brute_sets)
        ]
        t_brute, worst = 0.0, 0.0
        for p in sets:
            t = time.perf_counter()
            ref = brute_force_dice(store, p, rows)
            t_brute += time.perf_counter() - t
            worst = max(worst, float(np.abs(ev.per_pair(p)[rows] - ref).max()))
        per_set = t_brute / (len(sets) * len(rows)) * n
        report(
            f"brute force (steel.postprocess + Dice), {len(rows)} images x {len(sets)} parameter sets: "
            f"max |statistics - brute force| = {worst:.1e}; {per_set:.1f} s per parameter set over {n} images "
            f"(extrapolated)"
        )
        report(
            f"exact search vs brute force over the same grid ({mean_points:,} points per class, scored for all 4 "
            f"classes at once): {per_set * mean_points / 3600:,.0f} h vs {t_mean:.2f} s "
            f"({per_set * mean_points / t_mean:,.0f}x)"
        )
        assert worst <= 1e-9, "statistics disagree with brute force"

        if args.tpe_trials:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.create_study(direction="maximize", sampler=trial_seeded_tpe(cfg["sampler"], 0))
            objective = TPEObjective(ev, cfg)
            t = time.perf_counter()
            study.optimize(objective, n_trials=args.tpe_trials)
            dt = time.perf_counter() - t
            t = time.perf_counter()
            study.optimize(objective, n_trials=args.tpe_trials)
            dt2 = time.perf_counter() - t
            report(
                f"TPE through optuna's public API (study.optimize, in-memory storage): {args.tpe_trials} trials "
                f"in {dt:.1f} s ({args.tpe_trials / dt:.2f} trials/s, new thresholds labelled on first use), the "
                f"next {args.tpe_trials} in {dt2:.1f} s ({args.tpe_trials / dt2:.2f} trials/s); best "
                f"{study.best_value:.5f} (exact grid {ev.objective(best, 'mean', 1.0):.5f})"
            )

        if args.demo_images:
            demo = work / "demo-run"
            shutil.rmtree(demo, ignore_errors=True)
            write_synthetic_oof(demo / "oof", args.demo_images, 64, 320, 1, n_folds=10, seed=1)
            env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
            cmd = [sys.executable, "-m", "steel.cli", "sweep", str(demo)]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            dt = time.perf_counter() - t
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            res = json.loads((demo / "thresholds.json").read_text())
            report(
                f"`steel sweep RUN` on a demo-size store ({args.demo_images} images 64x320, stride 1; new process, "
                f"statistics, exact search, SQLite study, PNG, W&B offline): {dt:.1f} s wall, {cpu_s:.1f} s CPU "
                f"[target < 10 s]; OOF dice {res['oof_dice']['mean']:.5f} (default {res['default_dice']['mean']:.5f})"
            )
        report(f"load average at end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print("\n--- summary (markdown) ---")
        print(f"`python benchmarks/bench_sweep.py {' '.join(sys.argv[1:])}`".replace(" `", "`"))
        for line in out:
            print(f"- {line}")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
