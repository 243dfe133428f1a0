"""What a sweep leaves behind: ``thresholds.json`` (never replaced by a worse result on the same OOF store),
the PNG of Dice against pixel threshold and min-area, the W&B run, the lines it prints."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from steel import N_CLASSES
from steel.io import atomic_path, read_json
from steel.postprocess import THRESHOLDS_FILE, ClassParams, Params
from steel.sweep_solver import Evaluator


def write_thresholds(out_dir: Path, best: Params, summary: dict[str, Any]) -> str | None:
    """Write ``out_dir/thresholds.json`` unless the one there was tuned on the same OOF store, for the same
    objective, and scores better -> None, or the one line that says what was kept or replaced and why."""
    path = out_dir / THRESHOLDS_FILE
    try:
        old = read_json(path) if path.is_file() else None
        Params.from_dict(old) if old is not None else None
    except ValueError:
        old = None  # unreadable: replace it
    note = None
    if isinstance(old, dict):
        same = (old.get("oof_store") or {}).get("fingerprint") == summary["oof_store"]["fingerprint"] and (
            old.get("objective"),
            old.get("robust_k"),
        ) == (summary["objective"], summary["robust_k"])
        old_value = (old.get("oof_dice") or {}).get("objective")
        new_value = summary["oof_dice"]["objective"]
        if same and isinstance(old_value, int | float) and old_value > new_value + 1e-12:
            return (
                f"kept {path}: its objective {old_value:.5f} (study {old.get('study_name')!r}, {old.get('trials')} "
                f"trials) beats this run's {new_value:.5f}; delete it to replace it"
            )
        if not same:
            note = f"replaced {path} (tuned on another OOF store or for another objective)"
    best.save(path, **{k: v for k, v in summary.items() if k not in ("classes", "mode")})
    return note


def plot_curves(
    ev: Evaluator, cfg: dict[str, Any], best: Params, default: dict[str, Any], path: Path
) -> None:
    """PNG: per class, OOF Dice against pixel threshold and against min-area, other parameters at the best
    (the pixel curve at the grid component size nearest the best's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comp_grid = ev.stats.comp
    fig, axes = plt.subplots(2, N_CLASSES, figsize=(3.2 * N_CLASSES, 5.6), squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.88, bottom=0.09, hspace=0.45, wspace=0.3)
    for c, (p, dims) in enumerate(zip(best.classes, cfg["dims"])):
        best_dice = float(ev.class_dice(c, p, best.mode).mean())
        near = float(comp_grid[np.abs(comp_grid - p.min_component).argmin()])
        for row, key in enumerate(("pixel", "min_area")):
            xs = dims[key].values()
            base = {**p.__dict__, "min_component": near} if key == "pixel" else p.__dict__
            ys = [float(ev.class_dice(c, ClassParams(**{**base, key: x}), best.mode).mean()) for x in xs]
            ax = axes[row, c]
            ax.plot(xs, ys, marker=".", lw=1.2)
            ax.axvline(getattr(p, key), color="C3", ls=":", lw=1, label=f"best {getattr(p, key):.4g}")
            ax.axhline(default["per_class"][c], color="grey", ls="--", lw=1, label="default")
            ax.set_xlabel("pixel threshold" if key == "pixel" else "min area (full-res px)")
            ax.set_title(f"class {c + 1}: dice {best_dice:.4f}", fontsize=10)
            ax.legend(fontsize=7, loc="lower left")
            ax.grid(alpha=0.3)
        axes[0, c].set_ylabel("OOF dice" if c == 0 else "")
        axes[1, c].set_ylabel("OOF dice" if c == 0 else "")
    fig.suptitle(f"threshold sweep ({best.mode}): other parameters at the best", fontsize=11)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=72, format="png")
    plt.close(fig)


def log_wandb(
    run_dir: Path, summary: dict[str, Any], values: list[float], png: Path, name: str
) -> str | None:
    """Log the summary, the trials' objective values and the PNG to W&B (offline unless WANDB_MODE says
    otherwise; nothing when it is ``disabled``). Never fatal: the run id, or None after a warning."""
    if os.environ.get("WANDB_MODE", "offline") == "disabled":
        return None
    try:
        import wandb

        keys = ("mode", "objective", "robust_k", "stride", "study_name", "search")
        run = wandb.init(project="steel", group=run_dir.resolve().name, name=name, job_type="sweep",
                         dir=str(run_dir), mode=os.environ.get("WANDB_MODE", "offline"),
                         config={k: v for k, v in summary.items() if k in keys}, reinit="finish_previous")  # fmt: skip
        flat = {
            "oof_dice": summary["oof_dice"]["mean"],
            "default_dice": summary["default_dice"]["mean"],
            "trials": summary["trials"],
        }
        for c in range(N_CLASSES):
            flat[f"oof_dice_{c + 1}"] = summary["oof_dice"]["per_class"][c]
            for k, v in summary["classes"][str(c + 1)].items():
                flat[f"{k}_{c + 1}"] = v
        run.summary.update(flat)
        table = wandb.Table(data=[[i, v] for i, v in enumerate(values)], columns=["trial", "objective"])
        run.log({"trials": table, "dice_curves": wandb.Image(str(png))})
        run_id = run.id
        run.finish()
        return run_id
    except Exception as e:  # W&B trouble must never lose the sweep
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"steel sweep: warning: W&B logging failed ({type(e).__name__}: {first})", file=sys.stderr)
        return None


def print_summary(summary: dict[str, Any], best: Params, t_stats: float, stats_name: str) -> None:
    """The lines ``steel sweep`` prints."""
    oof, dflt = summary["oof_dice"], summary["default_dice"]
    res = "full-resolution areas" if summary["oof_store"]["full_res_areas"] else "areas at the stride"
    print(
        f"statistics: {summary['n_images']} images, stride {summary['stride']} ({res}), {t_stats:.1f} s ({stats_name})"
    )
    print(
        f"study {summary['study_name']!r} ({summary['search']}): {summary['trials']} finished trials, "
        f"best #{summary['best_trial']} objective {oof['objective']:.5f}"
    )
    print(f"OOF dice {oof['mean']:.5f} (default thresholds {dflt['mean']:.5f})")
    for c, p in enumerate(best.classes, 1):
        print(
            f"  class {c}: dice {oof['per_class'][c - 1]:.5f} (default {dflt['per_class'][c - 1]:.5f})  "
            f"label {p.label:.4g} pixel {p.pixel:.4g} min_area {p.min_area:.4g} min_component {p.min_component:.4g}"
            + (f" scale {p.scale:.4g}" if best.mode == "scaled" else "")
        )
