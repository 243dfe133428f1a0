"""``steel demo``: the whole chain on synthetic data, on CPU, resumable.

synth (balanced class mix) -> 4 stratified folds -> launch every fold of the embedded demo recipe -> OOF ->
sweep -> blend (flip TTA) -> sweep -> export -> pseudo-labels of the test images from the tuned blend -> a
second round of folds with them added to every fold's training images (1st place) -> OOF -> sweep -> blend -> sweep -> predict the synthetic test images -> score against their truth.
Ends with a table (all-empty baseline, default thresholds, tuned single run, tuned blend, pseudo-label round)
and a PNG report in the out dir.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from steel import N_CLASSES
from steel.errors import SteelError
from steel.io import read_json, write_json

RECIPE = "demo.yaml"
PSEUDO_ROW = "pseudo-label round (blend)"


def recipe_path() -> Path:
    """The embedded demo recipe (steel/resources/demo.yaml: experiments/tiny.yaml's net, trained longer)."""
    return Path(str(resources.files("steel") / "resources" / RECIPE))


def _step(title: str) -> float:
    print(f"\n==> {title}", flush=True)
    return time.time()


def _cli(*args: object) -> None:
    from steel.cli import main

    rc = main([str(a) for a in args])
    if rc != 0:
        raise SteelError(f"`steel {' '.join(map(str, args))}` exited {rc}")


def _score(sub: Path, data: Path) -> dict[str, float]:
    from steel.metrics import score_submission

    per_pair = score_submission(sub, data / "test_truth.csv", data / "test_images")
    per_class = per_pair[[f"dice_{c}" for c in range(1, N_CLASSES + 1)]].mean()
    return {
        "mean": float(per_class.mean()),
        **{f"dice_{c}": float(per_class[f"dice_{c}"]) for c in range(1, N_CLASSES + 1)},
    }


def _empty_submission(data: Path, out: Path) -> Path:
    from steel.labels import list_images, write_submission

    ids = list_images(data / "test_images")
    write_submission(ids, [[""] * N_CLASSES for _ in ids], out)
    return out


def _default_dir(blend_dir: Path, out: Path) -> Path:
    """A copy of the ensemble manifest with the default thresholds (0.5 label, 0.5 pixel, no area rules)."""
    from steel.postprocess import Params

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(blend_dir / "ensemble.yaml", out / "ensemble.yaml")
    Params.uniform().save(out / "thresholds.json", note="default thresholds, not tuned")
    return out


def report_png(out: Path, table: pd.DataFrame, data: Path, sub: Path, curves: Path | None) -> Path:
    """Per-class dice bars, the sweep's threshold curves and a few test images with predicted/true masks."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from steel import rle
    from steel.labels import read_submission

    truth = pd.read_csv(data / "test_truth.csv")
    pred = read_submission(sub)
    ids = [i for i in truth["ImageId"].unique()[:3]] or sorted(os.listdir(data / "test_images"))[:3]
    fig = plt.figure(figsize=(14, 4 + 2.2 * len(ids) + (4 if curves else 0)))
    rows = 1 + len(ids) + (2 if curves else 0)
    ax = fig.add_subplot(rows, 1, 1)
    x = np.arange(N_CLASSES + 1)
    for i, (name, r) in enumerate(table.iterrows()):
        vals = [r["mean"]] + [r[f"dice_{c}"] for c in range(1, N_CLASSES + 1)]
        ax.bar(x + (i - len(table) / 2 + 0.5) * 0.8 / len(table), vals, 0.8 / len(table), label=name)
    ax.set_xticks(x, ["mean"] + [f"class {c}" for c in range(1, N_CLASSES + 1)])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("dice (synthetic test)")
    ax.legend(loc="lower left", fontsize=8)
    colours = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48]], np.uint8)
    for j, image_id in enumerate(ids):
        img = cv2.imread(str(data / "test_images" / image_id), cv2.IMREAD_GRAYSCALE)
        h, w = img.shape
        rgb = np.repeat(img[..., None], 3, -1)
        panels = []
        for source in ("pred", "truth"):
            canvas = rgb.copy()
            for c in range(1, N_CLASSES + 1):
                if source == "pred":
                    s = pred[(pred["ImageId"] == image_id) & (pred["ClassId"] == c)]["EncodedPixels"]
                else:
                    s = truth[(truth["ImageId"] == image_id) & (truth["ClassId"] == c)]["EncodedPixels"]
                m = rle.decode(s.iloc[0] if len(s) else "", (h, w)).astype(bool)
                canvas[m] = (0.45 * canvas[m] + 0.55 * colours[c - 1]).astype(np.uint8)
            panels.append(canvas)
        a = fig.add_subplot(rows, 1, 2 + j)
        a.imshow(np.concatenate([panels[0], np.full((4, w, 3), 255, np.uint8), panels[1]]))
        a.set_title(
            f"{image_id}: prediction (top) / truth (bottom); class colours red, green, blue, orange",
            fontsize=9,
        )
        a.axis("off")
    if curves and curves.is_file():
        a = fig.add_subplot(rows, 1, (rows - 1, rows))
        a.imshow(plt.imread(curves))
        a.axis("off")
    fig.tight_layout()
    path = out / "report.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def demo(out: str | os.PathLike = "demo-out", n_train: int = 200, n_test: int = 60, folds: int = 4,
         trials: int = 0, parallel: int = 2, height: int = 64, width: int = 320, epochs: int | None = None,
         pseudo: bool = True, pseudo_hi: float = 0.95, pseudo_lo: float = 0.05) -> pd.DataFrame:  # fmt: skip
    """Run the chain into ``out`` (resuming what is done) and return the results table."""
    t0 = time.time()
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise SteelError(f"{out}: is a file, expected a directory for the demo")
    out.mkdir(parents=True, exist_ok=True)
    data, folds_csv, run, blend_dir = out / "data", out / "folds.csv", out / "runs" / "demo", out / "blend"
    wanted = {"n_train": n_train, "n_test": n_test, "height": height, "width": width, "folds": folds,
              "class_mix": "balanced", "recipe": RECIPE}  # fmt: skip
    stamp = out / "demo.json"
    if stamp.is_file() and read_json(stamp).get("data") != wanted:
        raise SteelError(
            f"{out} holds a demo made with other settings {read_json(stamp).get('data')}; use another --out"
        )
    seconds: dict[str, float] = {}

    def step(title: str) -> None:
        if seconds:
            seconds[list(seconds)[-1]] = round(time.time() - seconds[list(seconds)[-1]], 1)
        seconds[title.split(" ", 1)[0]] = time.time()
        _step(title)

    step(
        f"1/10 synthetic data: {n_train} train + {n_test} test images of {height}x{width}, classes balanced -> {data}"
    )
    if not (data / "sample_submission.csv").is_file():
        _cli("synth", data, "--n-train", n_train, "--n-test", n_test, "--height", height, "--width", width,
             "--seed", 0, "--class-mix", "balanced")  # fmt: skip
    else:
        print("already there")
    write_json(stamp, {"data": wanted})

    step(f"2/10 {folds} stratified folds -> {folds_csv}")
    if not folds_csv.is_file():
        _cli("folds", data, "--n-folds", folds, "--seed", 42, "--out", folds_csv)
    else:
        print("already there")

    step(f"3/10 launch {folds} folds of {RECIPE} on CPU ({parallel} at a time) -> {run}")
    extra = ["--trainer.max_epochs", epochs] if epochs else []
    _cli("launch", "--config", recipe_path(), "--run-dir", run, "--data-dir", data, "--folds-csv", folds_csv,
         "--parallel", parallel, "--oof-stride", 1, "--", *extra)  # fmt: skip

    step("4/10 threshold sweep on the run's OOF")
    if not (run / "thresholds.json").is_file():
        _cli("sweep", run, *(["--trials", trials] if trials else []))  # 0: the exact search
    else:
        print("already there")

    step("5/10 blend: every fold model with flip TTA (none,hflip,vflip), then its own sweep")
    _blend(run, blend_dir, trials)

    step("6/10 export: run and blend, one torch.export .pt2 file each")
    single_pt, blend_pt = out / "single.pt2", out / "ensemble.pt2"
    for src, dst in ((run, single_pt), (blend_dir, blend_pt)):
        if not dst.is_file() or dst.stat().st_mtime < (src / "thresholds.json").stat().st_mtime:
            _cli("export", src, "--out", dst)

    pseudo_dir, run2, blend2 = out / "pseudo", out / "runs" / "demo-pseudo", out / "blend-pseudo"
    if pseudo:
        step("7/10 pseudo-labels: test images where the tuned blend's classifier and masks agree confidently")
        if not (pseudo_dir / "pseudo.json").is_file():
            _cli("pseudo", blend_pt, "--images", data / "test_images", "--out", pseudo_dir,
                 "--hi", pseudo_hi, "--lo", pseudo_lo, "--workers", 0)  # fmt: skip
        else:
            print("already there")
        kept = read_json(pseudo_dir / "pseudo.json")["n_kept"]
        pseudo = kept > 0
        if not pseudo:
            print("no test image was confident enough: the pseudo-label round is skipped")
    if pseudo:
        # the 1st place way: the kept images join each fold's training images (each once an epoch, like theirs),
        # same recipe and epochs as round 1
        n_fold = int((pd.read_csv(folds_csv)["fold"] != 0).sum())
        share = round(kept / (n_fold + kept), 4)
        step(f"8/10 pseudo-label round: {folds} folds, each with the {kept} pseudo-labelled test images added "
             f"({share:.0%} of each epoch), OOF, sweep, blend, sweep -> {run2}")  # fmt: skip
        _cli("launch", "--config", recipe_path(), "--run-dir", run2, "--data-dir", data, "--folds-csv", folds_csv,
             "--parallel", parallel, "--oof-stride", 1, "--", *extra, "--data.pseudo_dir", pseudo_dir,
             "--data.pseudo_share", share)  # fmt: skip
        if not (run2 / "thresholds.json").is_file():
            _cli("sweep", run2, *(["--trials", trials] if trials else []))
        _blend(run2, blend2, trials)

    step("9/10 predict the synthetic test images")
    subs = {
        "all-empty baseline": _empty_submission(data, out / "submission_empty.csv"),
        "default thresholds (blend)": out / "submission_default.csv",
        "tuned single run": out / "submission_single.csv",
        "tuned blend": out / "submission.csv",
    }
    _cli(
        "predict",
        _default_dir(blend_dir, out / "blend-default"),
        "--images",
        data / "test_images",
        "--out",
        subs["default thresholds (blend)"],
        "--workers",
        0,
    )
    _cli(
        "predict",
        single_pt,
        "--images",
        data / "test_images",
        "--out",
        subs["tuned single run"],
        "--workers",
        0,
    )
    _cli("predict", blend_pt, "--images", data / "test_images", "--out", subs["tuned blend"], "--workers", 0)
    if pseudo:  # the round-2 blend dir, eagerly (the same forward as its export)
        subs[PSEUDO_ROW] = out / "submission_pseudo.csv"
        _cli("predict", blend2, "--images", data / "test_images", "--out", subs[PSEUDO_ROW], "--workers", 0)

    step("10/10 score against the synthetic test truth")
    table = pd.DataFrame({name: _score(sub, data) for name, sub in subs.items()}).T
    oof = {
        "tuned single run": read_json(run / "thresholds.json"),
        "tuned blend": read_json(blend_dir / "thresholds.json"),
        **({PSEUDO_ROW: read_json(blend2 / "thresholds.json")} if pseudo else {}),
    }
    table["oof_mean"] = [oof[n]["oof_dice"]["mean"] if n in oof else np.nan for n in table.index]
    curves = next(iter(sorted(blend_dir.glob("*.png"))), None)
    best = PSEUDO_ROW if pseudo else "tuned blend"
    png = report_png(out, table, data, subs[best], curves)
    step("done")
    write_json(
        out / "results.json",
        {"table": table.reset_index(names="row").to_dict("records"), "seconds": time.time() - t0,
         "step_seconds": {k: v for k, v in seconds.items() if k != "done"}},
    )  # fmt: skip

    print("\nmean Dice on the synthetic test images (per class), OOF mean of the tuned thresholds")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    base = table.loc["all-empty baseline"]
    cols = [f"dice_{c}" for c in range(1, N_CLASSES + 1)]
    below = [c[-1] for c in cols if table.loc[best, c] <= base[c]]
    print(f"\n{best}: every class above its all-empty baseline" if not below
          else f"\n{best}: class(es) {', '.join(below)} not above the all-empty baseline")  # fmt: skip
    if pseudo:
        d = table.loc[PSEUDO_ROW] - table.loc["tuned blend"]
        print(
            f"pseudo-label round vs tuned blend: mean {d['mean']:+.4f} ("
            + ", ".join(f"class {c[-1]} {d[c]:+.4f}" for c in cols)
            + ")"
        )
    wandb_dirs = sorted({str(p.parent) for p in run.glob("fold-*/wandb")})
    print(
        f"\nW&B offline runs:  {run}/fold-*/wandb (sync: wandb sync {run}/fold-0/wandb/offline-run-*)"
        if wandb_dirs
        else ""
    )
    print(f"thresholds:        {run / 'thresholds.json'}, {blend_dir / 'thresholds.json'}")
    print(f"exported ensemble: {blend_pt}")
    print(
        f"submission:        {subs['tuned blend']}"
        + (f", {subs[PSEUDO_ROW]} (pseudo-label round)" if pseudo else "")
    )
    print(f"report:            {png}")
    print(f"done in {time.time() - t0:.0f} s")
    return table


def _blend(run: Path, blend_dir: Path, trials: int) -> None:
    """Blend a run's fold models with flip TTA into ``blend_dir`` and sweep its OOF (unless done)."""
    if not (blend_dir / "thresholds.json").is_file():
        _cli("blend", run, "--out", blend_dir, "--tta", "none,hflip,vflip")
        _cli("sweep", blend_dir, *(["--trials", trials] if trials else []))
    else:
        print("already there")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="output directory (run again to resume)")
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-test", type=int, default=60)
    p.add_argument("--folds", type=int, default=4, help="folds of each round (4: two waves of --parallel 2)")
    p.add_argument("--trials", type=int, default=0, help="TPE trials per sweep (default 0: the exact search)")
    p.add_argument("--parallel", type=int, default=2, help="folds trained at once")
    p.add_argument(
        "--epochs", type=int, default=None, help="max_epochs of every round-1 fold (default: the recipe's 48)"
    )
    p.add_argument("--no-pseudo", action="store_true", help="skip the pseudo-label round")
    p.add_argument(
        "--pseudo-hi", type=float, default=0.95, help="`steel pseudo --hi` of the pseudo-label round"
    )
    p.add_argument(
        "--pseudo-lo", type=float, default=0.05, help="`steel pseudo --lo` of the pseudo-label round"
    )


def main(args: argparse.Namespace) -> int:
    demo(args.out, args.n_train, args.n_test, args.folds, args.trials, args.parallel, epochs=args.epochs,
         pseudo=not args.no_pseudo, pseudo_hi=args.pseudo_hi, pseudo_lo=args.pseudo_lo)  # fmt: skip
    return 0
