"""`steel sweep RUN_DIR`: post-processing thresholds of every class tuned on the run's OOF predictions.

The jobs, one module each: ``steel.sweep_config`` (sweeps/*.yaml), ``steel.oof_stats`` (statistics of the OOF
store, cached), ``steel.sweep_solver`` (exact search over label x min-area, objectives), ``steel.sweep_study``
(the Optuna study: storages, trials, TPE) and ``steel.sweep_report`` (thresholds.json, PNG, W&B, printout).
This module is the command line:

  * ``--search exact`` (default): every point of the config's grid, exactly; the study gets the default
    thresholds, the best and each class's runners-up as trials;
  * ``--search tpe --trials N`` (``--trials`` alone implies it): N Optuna TPE trials over pixel threshold and
    component size as continuous parameters, each with label and min-area solved exactly; the grid's exact
    best is tried first in a new study.
``mode: scaled`` in the config tunes a per-class scale as well: one statistics pass per scale of its grid.
``--workers N`` threads compute the statistics (and TPE's components at new thresholds); no child processes.
"""

from __future__ import annotations

import argparse
import secrets
import time
from pathlib import Path

from steel.errors import SteelError
from steel.io import locked
from steel.oof import OOFStore
from steel.oof_stats import load_or_compute_stats, store_fingerprint
from steel.postprocess import Params
from steel.sweep_config import SEARCHES, load_config, scale_grid, space_signature, sweep_grids
from steel.sweep_report import log_wandb, plot_curves, print_summary, write_thresholds
from steel.sweep_solver import Evaluator, scaled_candidates, solve, top_k
from steel.sweep_study import (
    TPEObjective,
    default_storage,
    mask_url,
    open_storage,
    open_study,
    params_of_trial,
    record_exact,
    run_tpe,
    trial_numbers,
    trial_seeded_tpe,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run or ensemble directory with oof/ (thresholds.json is written here)")
    p.add_argument(
        "--config", default=None, help="sweep config YAML (default: built-in = sweeps/default.yaml)"
    )
    p.add_argument(
        "--search",
        choices=SEARCHES,
        default=None,
        help="exact grid search or tpe (default: the config's, exact)",
    )
    p.add_argument(
        "--trials", type=int, default=None, help="TPE trials to add to the study (implies --search tpe)"
    )
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL (default sqlite:///RUN_DIR/sweep.db; journal:///FILE; postgresql+psycopg://...)",
    )
    p.add_argument("--workers", type=int, default=1, help="threads computing the OOF statistics (and TPE's)")
    p.add_argument("--study-name", default=None, help="study name (default thresholds-CONFIG[-tpe]-OOFSTORE)")
    p.add_argument("--seed", type=int, default=None, help="TPE seed (default: a fresh one, recorded)")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    search = args.search or ("tpe" if args.trials is not None else cfg["search"])
    if search == "exact" and args.trials is not None:
        raise SteelError(f"--trials {args.trials}: trials are for --search tpe (the exact search has none)")
    trials = cfg["trials"] if args.trials is None else args.trials
    if trials < 0:
        raise SteelError(f"--trials {trials} must be >= 0")
    if args.workers < 1:
        raise SteelError(f"--workers {args.workers} must be >= 1")
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise SteelError(f"{run_dir}: run directory not found")
    store = OOFStore(run_dir)
    if len(store) == 0:
        raise SteelError(f"{store.dir}: OOF store has no images")
    out_dir = store.dir.parent
    url = args.storage or default_storage(out_dir)
    storage = open_storage(url)  # a bad URL fails here, before the statistics
    fingerprint = store_fingerprint(store)
    stem = Path(args.config).stem if args.config else "default"
    name = args.study_name or f"thresholds-{stem}{'-tpe' if search == 'tpe' else ''}-{fingerprint[:8]}"
    attrs = {"space": space_signature(cfg, search), "oof": fingerprint, "stride": store.stride, "n_images": len(store),
             "full_res_areas": store.full_hist is not None and store.stride > 1}  # fmt: skip
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    sampler = trial_seeded_tpe(cfg["sampler"], seed) if search == "tpe" else None
    study = open_study(
        storage, url, name, attrs, sampler
    )  # another space or store fails here, before the work

    t0 = time.perf_counter()
    all_stats = []
    for scale in scale_grid(cfg):  # scaled mode: one statistics pass per scale (scale 0 = hard mode's)
        st, stats_path = load_or_compute_stats(
            store, *sweep_grids(cfg), cfg["mode"], workers=args.workers, scale=scale
        )
        all_stats.append(st)
    stats = all_stats[0]
    t_stats = time.perf_counter() - t0
    comp_high = max(float(d["min_component"].high) for d in cfg["dims"])
    base = [float(d["pixel"].low) for d in cfg["dims"]]  # TPE's thresholds: labelled on packed components
    ev = Evaluator(all_stats, store, bound=comp_high + 1, workers=args.workers, base=base)
    cands = [scaled_candidates(all_stats, c, cfg["dims"][c], ev.folds) for c in range(len(cfg["dims"]))]
    exact = solve(cands, ev.folds, cfg["objective"], float(cfg["robust_k"]))
    exact_best = Params(tuple(c.params(m) for c, m in zip(cands, exact.choice)), cfg["mode"])
    interrupted = False
    n_before = len(trial_numbers(study))
    if search == "exact":
        record_exact(study, cfg, ev, cands, exact, [top_k(c, int(cfg["top_k"])) for c in cands])
    else:
        objective = TPEObjective(ev, cfg)
        interrupted = run_tpe(study, objective, trials, [exact_best, Params.uniform(mode=cfg["mode"])])
    # count the study, pick its best and write thresholds.json under one lock: a concurrent sweep on the same
    # study that finishes later then always counts every trial finished before it writes
    with locked(out_dir / ".sweep.lock"):
        finished = trial_numbers(study)
        if not finished:
            raise SteelError(f"study {name!r} has no finished trials (run with --trials N > 0)")
        best_trial = study.best_trial
        best = params_of_trial(best_trial, cfg["mode"])
        oof = ev.summary(best)
        oof["objective"] = ev.objective(best, cfg["objective"], float(cfg["robust_k"]))
        default = Params.uniform(mode=cfg["mode"])
        dflt = ev.summary(default)
        summary = {
            "oof_dice": oof,
            "default_dice": dflt,
            "default_params": default.to_dict(),
            "stride": store.stride,
            "oof_store": {"fingerprint": fingerprint, "full_res_areas": stats.full_res},
            "search": search,
            "trials": len(finished),
            "trials_added": len(finished) - n_before,
            "objective": cfg["objective"],
            "robust_k": float(cfg["robust_k"]),
            "study_name": name,
            "storage": mask_url(url),
            "best_trial": best_trial.number,
            "config": cfg["source"],
            "n_images": len(store),
            **({"sampler_seed": seed} if search == "tpe" else {}),
            **best.to_dict(),
        }
        png = out_dir / "sweep.png"
        plot_curves(ev, cfg, best, dflt, png)
        values = [t.value for t in study.get_trials(deepcopy=False) if t.value is not None]
        summary["wandb_run_id"] = log_wandb(out_dir, summary, values, png, f"sweep-{name}")
        note = write_thresholds(out_dir, best, summary)
    from steel import tracking  # W&B lineage: the OOF store -> thresholds.json, in the sweep's run

    tracking.log_sweep(out_dir, run_id=summary["wandb_run_id"])
    print_summary(summary, best, t_stats, stats_path.name)
    print(note or f"wrote {out_dir / 'thresholds.json'} and {png}")
    return 130 if interrupted else 0
