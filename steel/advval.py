"""``steel advval DATA_DIR``: adversarial validation -- can a classifier tell train images from test images?

Every image of DATA_DIR/train_images and DATA_DIR/test_images becomes a vector of cheap image statistics
(``image_features``: grey-level histogram and percentiles, row/column profile spread, gradient and Laplacian
energy at native and reduced resolution, share of near-black pixels). A gradient-boosted tree classifier
(scikit-learn ``HistGradientBoostingClassifier``) learns train (0) vs test (1) under stratified K-fold
cross-validation; its out-of-fold probability is each image's *test-likeness*. AUC about 0.5: the folds look
like the test set; well above: they differ (12th place: 85 % accuracy, "different steel rolls"), and the most
test-like train images make a better validation set.

Writes OUT/ (default ``advval``): scores.csv (ImageId, split, test_likeness, cv_fold), advval.json (AUC overall
and per CV fold, the features that separate best on their own), advval.png (test-likeness of train vs test
images). ``--mark SHARE`` also writes a folds CSV (``--folds-out``, the ``steel folds`` layout) whose fold 0 is
the SHARE most test-like train images and fold 1 the rest: ``steel fit ... --data.folds_csv F --data.fold 0``
validates on them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from steel.errors import SteelError
from steel.io import atomic_path, write_json

SMALL = (64, 400)  # (h, w) of the reduced image some statistics are taken on
FEATURES = (
    [f"hist_{i}" for i in range(16)]
    + [f"p{q}" for q in (1, 5, 25, 50, 75, 95, 99)]
    + ["mean", "std", "row_profile_std", "col_profile_std", "dark_share", "bright_share"]
    + ["grad_x", "grad_y", "laplacian_var", "grad_x_small", "grad_y_small", "laplacian_var_small"]
)
NO_SHIFT_AUC = 0.6  # below this the report says no shift was detected


def image_features(img: np.ndarray) -> np.ndarray:
    """Statistics of a grey uint8 image (H, W) -> float32 (len(FEATURES),)."""
    import cv2

    full = img.astype(np.float32)
    small = cv2.resize(img, SMALL[::-1], interpolation=cv2.INTER_AREA).astype(np.float32)
    hist = np.bincount((img >> 4).ravel(), minlength=16) / img.size
    q = np.percentile(small, (1, 5, 25, 50, 75, 95, 99))
    stats = [
        full.mean(),
        full.std(),
        small.mean(1).std(),
        small.mean(0).std(),
        (img < 20).mean(),
        (img > 235).mean(),
    ]
    tex = [
        np.abs(np.diff(full, axis=1)).mean(),
        np.abs(np.diff(full, axis=0)).mean(),
        cv2.Laplacian(full, cv2.CV_32F).var(),
        np.abs(np.diff(small, axis=1)).mean(),
        np.abs(np.diff(small, axis=0)).mean(),
        cv2.Laplacian(small, cv2.CV_32F).var(),
    ]
    return np.concatenate([hist, q, stats, tex]).astype(np.float32)


def _features_of(path: str) -> np.ndarray | None:
    from steel.images import read_grey

    return image_features(read_grey(path))  # SteelError naming a truncated or corrupt file


def features(paths: list[Path], workers: int = 0, desc: str = "features") -> np.ndarray:
    """float32 (N, len(FEATURES)) of image files, with ``workers`` processes (0: this one)."""
    from tqdm import tqdm

    names = [str(p) for p in paths]
    if workers > 0:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            rows = list(tqdm(pool.imap(_features_of, names, chunksize=16), total=len(names), desc=desc))
    else:
        rows = [_features_of(n) for n in tqdm(names, desc=desc)]
    bad = [n for n, r in zip(names, rows) if r is None]
    if bad:
        raise SteelError(f"{bad[0]}: cannot read image (corrupt or not an image)")
    return np.stack(rows) if rows else np.zeros((0, len(FEATURES)), np.float32)


def single_feature_auc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """AUC of each column of x (N, F) alone as a score for y (N,) 0/1 (ties averaged): (F,)."""
    from scipy.stats import rankdata

    r = rankdata(x, axis=0)
    n1, n0 = int(y.sum()), int((1 - y).sum())
    return (r[y == 1].sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0)


def adversarial_scores(
    x: np.ndarray, y: np.ndarray, n_splits: int = 5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Out-of-fold P(test) of every row of x (N, F) with labels y (N,) (1 = test), the CV fold of each row,
    and the AUC of each CV fold."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    prob = np.zeros(len(y), np.float64)
    fold = np.zeros(len(y), np.int64)
    aucs = []
    for k, (tr, va) in enumerate(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(x, y)):
        clf = HistGradientBoostingClassifier(
            max_iter=100, learning_rate=0.1, max_leaf_nodes=15, l2_regularization=1.0,
            early_stopping=True, n_iter_no_change=10, random_state=seed,
        )  # fmt: skip
        with threadpool_limits(1):  # small data: OpenMP threads cost more than they gain on shared cores
            clf.fit(x[tr], y[tr])
            prob[va] = clf.predict_proba(x[va])[:, 1]
        fold[va] = k
        aucs.append(float(roc_auc_score(y[va], prob[va])))
    return prob, fold, aucs


def plot(path: Path, scores: pd.DataFrame, auc: float, cut: float | None) -> Path:
    """Histogram PNG of the test-likeness of train and test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    bins = np.linspace(0, 1, 41)
    for split, colour in (("train", "tab:blue"), ("test", "tab:orange")):
        v = scores.loc[scores["split"] == split, "test_likeness"]
        ax.hist(v, bins=bins, alpha=0.6, color=colour, label=f"{split} ({len(v)})", density=True)
    if cut is not None:
        ax.axvline(cut, color="k", ls="--", lw=1, label="marked train images to the right")
    ax.set_xlabel("test-likeness (out-of-fold P(test))")
    ax.set_ylabel("density")
    verdict = "no shift detected" if auc < NO_SHIFT_AUC else "train and test differ"
    ax.set_title(f"adversarial validation: AUC {auc:.3f} ({verdict})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


def advval(
    data_dir: str | os.PathLike,
    out: str | os.PathLike = "advval",
    test_images: str | os.PathLike | None = None,
    n_splits: int = 5,
    seed: int = 0,
    mark: float | None = None,
    folds_out: str | os.PathLike | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Run the adversarial validation of ``data_dir`` into ``out``; returns the summary (advval.json)."""
    from sklearn.metrics import roc_auc_score

    from steel.labels import list_images

    data_dir, out = Path(data_dir), Path(out)
    train_dir = data_dir / "train_images"
    test_dir = Path(test_images) if test_images else data_dir / "test_images"
    train_names, test_names = list_images(train_dir), list_images(test_dir)
    for d, names in ((train_dir, train_names), (test_dir, test_names)):
        if len(names) < n_splits:
            raise SteelError(f"{d}: {len(names)} images, need at least {n_splits} (one per CV fold)")
    if n_splits < 2:
        raise SteelError(f"--n-splits {n_splits}: need at least 2")
    if mark is not None and not 0.0 < mark < 1.0:
        raise SteelError(f"--mark {mark}: the share of train images to mark must be in (0, 1)")
    if out.exists() and not out.is_dir():
        raise SteelError(f"{out}: is a file, expected a directory for the report")
    x = features([train_dir / n for n in train_names] + [test_dir / n for n in test_names], workers)
    y = np.r_[np.zeros(len(train_names)), np.ones(len(test_names))].astype(np.int64)
    prob, cv_fold, aucs = adversarial_scores(x, y, n_splits, seed)
    auc = float(roc_auc_score(y, prob))
    single = single_feature_auc(x, y)
    order = np.argsort(-np.abs(single - 0.5))
    scores = pd.DataFrame({"ImageId": train_names + test_names, "split": np.where(y == 1, "test", "train"),
                           "test_likeness": prob.round(6), "cv_fold": cv_fold})  # fmt: skip
    summary: dict[str, Any] = {
        "data_dir": str(data_dir.resolve()),
        "test_images": str(test_dir.resolve()),
        "n_train": len(train_names),
        "n_test": len(test_names),
        "auc": auc,
        "auc_per_fold": aucs,
        "auc_fold_std": float(np.std(aucs)),
        "shift_detected": auc >= NO_SHIFT_AUC,
        "top_features": [{"feature": FEATURES[i], "auc": float(single[i])} for i in order[:5]],
        "model": "HistGradientBoostingClassifier, stratified K-fold out-of-fold probabilities",
        "n_splits": n_splits,
        "seed": seed,
    }
    out.mkdir(parents=True, exist_ok=True)
    cut = None
    if mark is not None:
        from steel.folds import HAS, write_folds
        from steel.labels import read_train

        train = scores[scores["split"] == "train"].sort_values("test_likeness", ascending=False)
        k = max(1, int(round(mark * len(train))))
        cut = float(train["test_likeness"].iloc[k - 1])
        table = read_train(data_dir).set_index("ImageId")
        folds = pd.DataFrame({"ImageId": train["ImageId"].to_numpy(), "fold": np.r_[np.zeros(k), np.ones(len(train) - k)].astype(int)})  # fmt: skip
        folds[HAS] = table.loc[folds["ImageId"], HAS].to_numpy()
        folds_out = Path(folds_out) if folds_out else out / "folds_advval.csv"
        write_folds(folds, folds_out, f"steel advval {data_dir} --mark {mark} --seed {seed}")
        summary.update({"marked": k, "marked_share": mark, "marked_min_test_likeness": cut,
                        "folds_csv": str(folds_out)})  # fmt: skip
    with atomic_path(out / "scores.csv", ".csv") as tmp:
        scores.to_csv(tmp, index=False)
    plot(out / "advval.png", scores, auc, cut)
    write_json(out / "advval.json", summary)
    verdict = "no shift detected" if auc < NO_SHIFT_AUC else "train and test images differ"
    top = summary["top_features"][0]
    print(f"advval: AUC {auc:.3f} (CV folds {np.mean(aucs):.3f} +- {np.std(aucs):.3f}; 0.5 = alike): {verdict}; "
          f"best single feature {top['feature']} (AUC {top['auc']:.3f}) -> {out}")  # fmt: skip
    if mark is not None:
        print(
            f"advval: the {summary['marked']} most test-like train images are fold 0 of {summary['folds_csv']}"
        )
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", help="data dir with train_images/ and test_images/ (train.csv for --mark)")
    p.add_argument("--out", default="advval", help="report dir (scores.csv, advval.json, advval.png)")
    p.add_argument("--test-images", default=None, help="test image dir (default DATA_DIR/test_images)")
    p.add_argument("--n-splits", type=int, default=5, help="cross-validation folds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mark", type=float, default=None, help="share of most test-like train images made fold 0"
    )
    p.add_argument("--folds-out", default=None, help="folds CSV for --mark (default OUT/folds_advval.csv)")
    p.add_argument("--workers", type=int, default=0, help="image reading processes (0 = this one)")


def main(args: argparse.Namespace) -> int:
    advval(args.data_dir, args.out, args.test_images, args.n_splits, args.seed, args.mark, args.folds_out,
           args.workers)  # fmt: skip
    return 0
