"""Threshold-sweep speed: sufficient statistics + fast Dice vs brute-force re-thresholding, same run.

Builds a synthetic OOF store (default: the full Kaggle train set, 12,568 images, 256x1600 at stride 2 ->
4 x 128 x 800 per image; ~5 GB masks + ~5 GB truth memmaps on disk), then prints:
  * statistics precompute time (cold, streamed over the memmap, --workers processes) and cache load time;
  * time of --trials parameter evaluations with FastDice (the objective alone);
  * brute force (steel.postprocess on every mask + steel.metrics.dice_per_pair) on --brute-images images
    for --brute-sets parameter sets, extrapolated per image to the whole store, and the per-trial ratio;
  * --trials trials of the sweep's study end to end (``run_study``: batched TPE, one write per batch) in
    memory (1 process), in a journal file and in SQLite (--workers processes), against the baseline of the
    same run: optuna's per-trial ``study.optimize`` with the TPESampler the sweep used before (in memory);
  * the default ``steel sweep RUN --trials 1000`` as a user runs it (new SQLite study in the run dir,
    cached statistics, 1 process, W&B offline, PNG): wall and CPU time.
The fast and brute-force Dice of the subset are checked to agree to 1e-9.

    python benchmarks/bench_sweep.py                   # full size (needs ~11 GB of disk, several minutes)
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
from steel.sweep import (  # noqa: E402
    FastDice,
    Objective,
    brute_force_dice,
    load_config,
    load_or_compute_stats,
    params_from_trial,
    run_study,
    sweep_grids,
    write_synthetic_oof,
)

DEFAULT = {"label": 0.5, "pixel": 0.5, "min_area": 0, "min_component": 0}


def random_values(cfg: dict, rng: np.random.Generator) -> dict:
    return {
        f"{k}_{c}": d.value(int(rng.integers(d.n)))
        for c, dims in enumerate(cfg["dims"], 1)
        for k, d in dims.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=12568)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument(
        "--storage-trials", type=int, default=1000, help="trials for the journal / SQLite runs (0: skip)"
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--baseline-trials",
        type=int,
        default=1000,
        help="trials of the per-trial optuna TPESampler baseline (0: skip)",
    )
    ap.add_argument("--cli-trials", type=int, default=1000, help="trials of the `steel sweep` run (0: skip)")
    ap.add_argument("--brute-images", type=int, default=200)
    ap.add_argument("--brute-sets", type=int, default=3)
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
        t = time.perf_counter()
        reuse = (run / "oof" / "meta.json").is_file() and len(OOFStore(run)) == args.n_images
        if not reuse:
            shutil.rmtree(run, ignore_errors=True)
            write_synthetic_oof(
                run / "oof", args.n_images, args.height, args.width, args.stride, seed=0, progress=True
            )
        store = OOFStore(run)
        n, h, w = len(store), *store.masks.shape[-2:]
        gb = 2 * store.masks.nbytes / 1e9
        report(f"store: {n} images x 4 x {h} x {w} (stride {store.stride}), masks+truth {gb:.1f} GB on disk")
        if not reuse:
            report(f"synthetic store written in {time.perf_counter() - t:.1f} s")

        cfg = load_config(args.config)
        pixel, comp = sweep_grids(cfg)
        for f in store.dir.glob("stats-*.npz"):
            f.unlink()
        t = time.perf_counter()
        stats, path = load_or_compute_stats(store, pixel, comp, cfg["mode"], workers=args.workers)
        t_pre = time.perf_counter() - t
        report(
            f"precompute: {t_pre:.1f} s with {args.workers} process(es) ({t_pre / n * 1e3:.2f} ms/image; "
            f"grid {len(pixel)} pixel x {len(comp)} component sizes; cache {path.stat().st_size / 1e6:.0f} MB)"
        )
        t = time.perf_counter()
        stats, _ = load_or_compute_stats(store, pixel, comp, cfg["mode"], progress=False)
        report(f"cached statistics load: {time.perf_counter() - t:.2f} s")
        fast = FastDice(stats, np.asarray(store.cls), store.folds)
        objective = Objective(fast, cfg)

        rng = np.random.default_rng(0)
        sets = [random_values(cfg, rng) for _ in range(args.trials)]
        objective(optuna.trial.FixedTrial(sets[0]))  # warm the per-(class, grid cell) caches once
        t = time.perf_counter()
        for v in sets:
            objective(optuna.trial.FixedTrial(v))
        t_fast = (time.perf_counter() - t) / len(sets)
        report(
            f"fast objective: {args.trials} evaluations in {t_fast * len(sets):.2f} s ({t_fast * 1e3:.3f} ms/trial)"
        )

        rows = np.sort(rng.choice(n, size=min(args.brute_images, n), replace=False))
        t_brute, worst = 0.0, 0.0
        for v in sets[: args.brute_sets]:
            params = params_from_trial(v, cfg)
            t = time.perf_counter()
            ref = brute_force_dice(store, params, rows)
            t_brute += time.perf_counter() - t
            worst = max(worst, float(np.abs(fast.per_pair(params)[rows] - ref).max()))
        per_image = t_brute / (args.brute_sets * len(rows))
        per_trial = per_image * n
        report(
            f"brute force: {per_image * 1e3:.2f} ms/image on {len(rows)} images x {args.brute_sets} sets "
            f"-> {per_trial:.1f} s/trial over {n} images (extrapolated); max |fast - brute| = {worst:.1e}"
        )
        report(f"speed-up per trial (brute force / fast objective): {per_trial / t_fast:,.0f}x")
        assert worst <= 1e-9, "fast dice disagrees with brute force"

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from steel.sweep import open_storage

        t_base = None
        if args.baseline_trials:
            sampler = optuna.samplers.TPESampler(
                seed=0, n_startup_trials=50, multivariate=True, n_ei_candidates=24, constant_liar=True
            )
            study = optuna.create_study(direction="maximize", sampler=sampler)
            study.enqueue_trial(  # as the sweep did: the default thresholds first
                {
                    f"{k}_{c}": d[k].value(d[k].index(v))
                    for c, d in enumerate(cfg["dims"], 1)
                    for k, v in DEFAULT.items()
                }
            )
            t = time.perf_counter()
            study.optimize(objective, n_trials=args.baseline_trials)
            t_base = (time.perf_counter() - t) / args.baseline_trials
            report(
                f"baseline, optuna TPESampler(multivariate, 16 params) + study.optimize, per trial, in memory: "
                f"{args.baseline_trials} trials in {t_base * args.baseline_trials:.1f} s "
                f"({t_base * 1e3:.1f} ms/trial), best {study.best_value:.5f}"
            )
        runs = [("in-memory", optuna.storages.InMemoryStorage(), "memory", 1, args.trials)]
        if args.storage_trials:
            runs.append(
                ("journal file", None, f"journal://{work / 'sweep.log'}", args.workers, args.storage_trials)
            )
            runs.append(("SQLite", None, f"sqlite:///{work / 'sweep.db'}", 1, args.storage_trials))
            if args.workers > 1:
                runs.append(
                    ("SQLite", None, f"sqlite:///{work / 'sweep.db'}", args.workers, args.storage_trials)
                )
        for label, storage, url, workers, trials in runs:
            storage = storage or open_storage(url)
            t = time.perf_counter()
            study, _, _ = run_study(
                fast, cfg, url, storage, f"bench-{label}-{workers}", trials, workers, 0, path, store.dir
            )
            dt = time.perf_counter() - t
            vs = f", {t_base * trials / dt:.1f}x the baseline" if t_base else ""
            report(
                f"sweep study (batched TPE), {label} storage, {workers} process(es): {trials} trials in "
                f"{dt:.1f} s ({dt / trials * 1e3:.2f} ms/trial{vs}), best {study.best_value:.5f}"
            )
        if args.cli_trials:
            cli_run = work / "cli-run"
            shutil.rmtree(cli_run, ignore_errors=True)
            cli_run.mkdir()
            (cli_run / "oof").symlink_to(store.dir.resolve())
            env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
            cmd = [sys.executable, "-m", "steel.cli", "sweep", str(cli_run), "--trials", str(args.cli_trials)]
            cmd += ["--config", args.config] if args.config else []
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            dt = time.perf_counter() - t
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            out_json = json.loads((cli_run / "thresholds.json").read_text())
            report(
                f"`steel sweep RUN --trials {args.cli_trials}` end to end (new SQLite study, cached statistics, "
                f"1 process, W&B offline, PNG): {dt:.1f} s wall, {cpu:.1f} s CPU; OOF dice "
                f"{out_json['oof_dice']['mean']:.5f} (default thresholds {out_json['default_dice']['mean']:.5f})"
            )
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
