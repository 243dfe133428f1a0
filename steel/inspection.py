"""``steel inspect``: look at the model -- class activation maps (CAM) of the label head, and the OOF error gallery.

``steel inspect cam SOURCE`` (a checkpoint, a run dir or an ensemble dir: every fold net, CAMs averaged):
for net f, native image x and class c the map is ``W_c . F(x, y)``, the label head's linear weights applied to
the deepest encoder features at every position (captured with a forward hook on smp's
``classification_head``); with avg pooling its mean over positions plus the bias is exactly the class logit,
with max pooling it is the usual CAM. Maps are resized like the mask probabilities (``steel.ensemble``) to the
native image. One PNG per image: the image (true masks outlined when labels are known), then per class the
positive part of the map over the image, with the class probability.

``steel inspect gallery DIR`` (a run or ensemble dir with oof/ and thresholds.json): the OOF probabilities
through the tuned decision rule (``steel.postprocess.postprocess``, whatever its gating mode), scored per
(image, class); per class the k worst false positives (empty truth, largest predicted area), false negatives
(largest missed area) and lowest dice among images with both masks, drawn with the prediction (red), the truth
(green) and their overlap (yellow) over the image. PNG per class + gallery.csv; both commands log their PNGs to
W&B (offline unless WANDB_MODE says otherwise; ``--no-wandb``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from steel import N_CLASSES
from steel.errors import SteelError
from steel.images import read_grey
from steel.io import atomic_path

KINDS = ("false positive", "false negative", "lowest dice")


# ---- class activation maps ------------------------------------------------------------------------------------
def _checkpoints(source: Path) -> list[Path]:
    """Fold checkpoints of a checkpoint file, a fold dir (its best.ckpt), a run dir or an ensemble dir."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise SteelError(f"{source}: not found (expected a checkpoint, a run dir or an ensemble dir)")
    if (source / "best.ckpt").is_file() and not (source / "ensemble.yaml").is_file():
        return [source / "best.ckpt"]  # a fold dir
    from steel.blend import ensemble_spec

    return [Path(c) for m in ensemble_spec(source)["members"] for c in m["checkpoints"]]


def head_maps(net: Any, xin: Any) -> tuple[Any, Any]:
    """``W_c . F`` of a ``TwoHeadNet`` on its input xin (B, 1, h, w) -> (maps float32 (B, 4, h', w') at the
    deepest feature resolution, label logits (B, 4)). Features come from a forward hook on smp's
    ``classification_head`` (its input)."""
    import torch

    head = net.net.classification_head
    linear = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    try:
        with torch.no_grad():
            logits = net(xin)["label"]
            maps = torch.einsum("bkhw,ck->bchw", seen[-1].float(), linear.weight.float())
    finally:
        hook.remove()
    return maps, logits.float()


def class_activation_maps(model: Any, x: Any) -> tuple[Any, Any]:
    """CAMs of one ``SteelModule`` on native images x float (B, 1, H, W) in [0, 1] -> (maps float32 (B, 4, H, W),
    class probs (B, 4)); the maps (``head_maps``) are resized to the native size like the mask probabilities."""
    import torch
    import torch.nn.functional as F

    from steel.ensemble import to_model_size, to_native

    size = list(model.input_size) if model.input_size is not None else None
    xin = to_model_size(x, size)
    maps, logits = head_maps(model.net, xin)
    maps = F.interpolate(maps, size=xin.shape[-2:], mode="bilinear", align_corners=False)
    return to_native(maps, x.shape[-2], x.shape[-1], size), torch.sigmoid(logits)


def _labels_of(data_dir: Path | None) -> pd.DataFrame | None:
    if data_dir is None or not (data_dir / "train.csv").is_file():
        return None
    from steel.labels import read_train

    return read_train(data_dir).set_index("ImageId")


def default_images(table: pd.DataFrame, per_class: int = 1) -> list[str]:
    """``per_class`` train images having each class (first by name) and as many defect-free ones."""
    has = table[[f"has_{c}" for c in range(1, N_CLASSES + 1)]].to_numpy() > 0
    picked: list[str] = []
    for col in [*(has[:, c] for c in range(N_CLASSES)), ~has.any(1)]:
        picked += [i for i in table.index[col] if i not in picked][:per_class]
    return picked


def _overlay(grey: np.ndarray, pred: np.ndarray | None, true: np.ndarray | None) -> np.ndarray:
    """RGB uint8 (H, W, 3): grey image, prediction red, truth green, both yellow (alpha 0.45)."""
    rgb = np.repeat(grey[..., None], 3, -1).astype(np.float32)
    colour = np.zeros_like(rgb)
    p = pred.astype(bool) if pred is not None else np.zeros(grey.shape, bool)
    t = true.astype(bool) if true is not None else np.zeros(grey.shape, bool)
    colour[p] = (230, 25, 25)
    colour[t] = (25, 200, 25)
    colour[p & t] = (245, 220, 20)
    a = 0.45 * (p | t)[..., None]
    return (rgb * (1 - a) + colour * a).astype(np.uint8)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path


def cam(
    source: str | os.PathLike,
    out: str | os.PathLike,
    images: list[str] | None = None,
    data_dir: str | os.PathLike | None = None,
    per_class: int = 1,
    device: str = "cpu",
    wandb: bool = True,
) -> list[Path]:
    """CAM PNGs of ``images`` (paths, or names under DATA_DIR/train_images; default ``default_images``) into
    ``out``; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from steel.labels import masks_of
    from steel.module import load_model

    source, out = Path(source), Path(out)
    ckpts = _checkpoints(source)
    data_dir = Path(data_dir) if data_dir is not None else run_data_dir(source)
    table = _labels_of(data_dir)
    if not images:
        if table is None:
            raise SteelError("no --images given and no labelled data dir (--data-dir) to choose them from")
        images = default_images(table, per_class)
    paths = [
        Path(i) if Path(i).is_file() or data_dir is None else data_dir / "train_images" / i for i in images
    ]
    grey = []
    for p in paths:
        img = read_grey(p)  # SteelError naming a missing, truncated or corrupt file
        if grey and img.shape != grey[0].shape:
            raise SteelError(
                f"{p}: image is {img.shape[0]}x{img.shape[1]}, {paths[0].name} is {grey[0].shape}"
            )
        grey.append(img)
    x = torch.from_numpy(np.stack(grey)).float().div_(255).unsqueeze(1).to(device)
    maps, probs = 0.0, 0.0
    for ck in ckpts:
        model = load_model(ck, map_location=device)
        m, p = class_activation_maps(model, x)
        maps, probs = maps + m.cpu().numpy() / len(ckpts), probs + p.cpu().numpy() / len(ckpts)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (path, img) in enumerate(zip(paths, grey)):
        truth = (
            masks_of(table.loc[path.name], img.shape)
            if table is not None and path.name in table.index
            else None
        )
        fig, axes = plt.subplots(N_CLASSES + 1, 1, figsize=(12, 1.6 * (N_CLASSES + 1) * max(0.4, 8 * img.shape[0] / img.shape[1])))  # fmt: skip
        axes[0].imshow(_overlay(img, None, truth.any(0) if truth is not None else None))
        present = [c + 1 for c in range(N_CLASSES) if truth is not None and truth[c].any()]
        axes[0].set_title(f"{path.name}" + (f": true classes {present or 'none'} (green)" if truth is not None else ""),
                          fontsize=9)  # fmt: skip
        for c in range(N_CLASSES):
            heat = np.clip(maps[i, c], 0, None)
            ax = axes[c + 1]
            ax.imshow(img, cmap="gray")
            ax.imshow(heat / max(float(heat.max()), 1e-6), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            label = "" if truth is None else f", true: {'yes' if truth[c].any() else 'no'}"
            ax.set_title(f"class {c + 1}: P = {probs[i, c]:.3f}{label}; CAM max {heat.max():.2f}", fontsize=9)
        for ax in axes:
            ax.axis("off")
        fig.tight_layout()
        written.append(_save(fig, out / f"cam_{path.stem}.png"))
    if wandb:
        log_images(out, "cam", {p.stem: p for p in written}, {"source": str(source), "models": len(ckpts)})
    print(f"inspect cam: {len(written)} images, {len(ckpts)} fold nets -> {out}")
    return written


def run_data_dir(source: Path) -> Path | None:
    """data.data_dir of the run behind a checkpoint (its fold dir or run dir), a run dir or an ensemble dir's
    first member; None when no config names one."""
    from steel.rundir import data_dir_of

    if (source / "ensemble.yaml").is_file():
        from steel.blend import ensemble_spec

        source = Path(ensemble_spec(source)["members"][0]["run_dir"])
    for d in [source] if source.is_dir() else [source.parent, source.parent.parent]:
        try:
            return Path(data_dir_of(d))
        except SteelError:
            continue
    return None


# ---- OOF error gallery ---------------------------------------------------------------------------------------
def oof_errors(source: str | os.PathLike) -> pd.DataFrame:
    """Per (OOF image, class): the tuned rule's prediction against the truth. Columns ImageId, row, class,
    cls_prob, pred_area, true_area, dice (areas in full-resolution pixels)."""
    from tqdm import tqdm

    from steel.metrics import dice_from_counts
    from steel.oof import OOFStore
    from steel.postprocess import Params, postprocess

    store, params = OOFStore(source), Params.load(source)
    s = store.stride
    n = len(store)
    inter, pa, ta = (np.zeros((n, N_CLASSES), np.int64) for _ in range(3))
    for i in tqdm(range(n), desc="oof errors", unit="img", disable=n < 200):
        pred = postprocess(store.masks[i], store.cls[i], params, s)
        truth = store.truth[i].astype(bool)
        inter[i], pa[i], ta[i] = (pred & truth).sum((1, 2)), pred.sum((1, 2)), truth.sum((1, 2))
    dice = dice_from_counts(inter, pa, ta)
    return pd.DataFrame({
        "ImageId": np.repeat(store.ids, N_CLASSES), "row": np.repeat(np.arange(n), N_CLASSES),
        "class": np.tile(np.arange(1, N_CLASSES + 1), n), "cls_prob": np.asarray(store.cls).ravel(),
        "pred_area": (pa * s * s).ravel(), "true_area": (ta * s * s).ravel(), "dice": dice.ravel(),
    })  # fmt: skip


def worst(errors: pd.DataFrame, k: int = 3) -> pd.DataFrame:
    """Per class the k worst of each kind (``KINDS``): columns of ``errors`` plus kind and rank (0 = worst)."""
    parts = []
    for c in range(1, N_CLASSES + 1):
        e = errors[errors["class"] == c]
        fp = e[(e["true_area"] == 0) & (e["pred_area"] > 0)].sort_values(
            ["pred_area", "cls_prob"], ascending=False
        )
        fn = e[(e["true_area"] > 0) & (e["pred_area"] == 0)].sort_values(["true_area", "cls_prob"], ascending=[False, True])  # fmt: skip
        both = e[(e["true_area"] > 0) & (e["pred_area"] > 0)].sort_values(["dice", "true_area"], ascending=[True, False])  # fmt: skip
        for kind, rows in zip(KINDS, (fp, fn, both)):
            rows = rows.head(k).assign(kind=kind)
            parts.append(rows.assign(rank=np.arange(len(rows))))
    return pd.concat(parts, ignore_index=True) if parts else errors.head(0)


def gallery(source: str | os.PathLike, out: str | os.PathLike, k: int = 3, wandb: bool = True) -> list[Path]:
    """The OOF error gallery of a run/ensemble dir into ``out`` (gallery_class{c}.png, gallery.csv)."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from steel.oof import OOFStore
    from steel.postprocess import Params, postprocess

    if k < 1:
        raise SteelError(f"--k {k}: must be >= 1")
    source, out = Path(source), Path(out)
    store, params = OOFStore(source), Params.load(source)
    data_dir = Path(store.meta.get("data_dir") or "")
    errors = oof_errors(source)
    picked = worst(errors, k)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "gallery.csv", ".csv") as tmp:
        picked.to_csv(tmp, index=False)
    s, written = store.stride, {}
    for c in range(1, N_CLASSES + 1):
        rows = picked[picked["class"] == c]
        n_rows = max(1, len(rows))
        h, w = store.truth.shape[-2:]
        fig, axes = plt.subplots(n_rows, 1, figsize=(12, max(1.0, 12 * h / w) * n_rows + 0.6), squeeze=False)
        if rows.empty:
            axes[0, 0].text(0.5, 0.5, f"class {c}: no errors in the OOF", ha="center", va="center")
        for ax, r in zip(axes[:, 0], rows.itertuples(index=False)):
            img = cv2.imread(str(data_dir / "train_images" / r.ImageId), cv2.IMREAD_GRAYSCALE)
            img = img[::s, ::s] if img is not None else np.full((h, w), 128, np.uint8)
            pred = postprocess(store.masks[r.row], store.cls[r.row], params, s)[c - 1]
            ax.imshow(_overlay(img[:h, :w], pred, store.truth[r.row, c - 1]))
            ax.set_title(f"{r.kind} #{r.rank + 1}: {r.ImageId}  P(class {c}) = {r.cls_prob:.3f}, predicted "
                         f"{int(r.pred_area)} px, true {int(r.true_area)} px, dice {r.dice:.3f}", fontsize=9)  # fmt: skip
        for ax in axes[:, 0]:
            ax.axis("off")
        fig.suptitle(
            f"class {c}: worst OOF errors (prediction red, truth green, overlap yellow)", fontsize=10
        )
        fig.tight_layout()
        written[f"class_{c}"] = _save(fig, out / f"gallery_class{c}.png")
    if wandb:
        table = errors.groupby("class")["dice"].mean().to_dict()
        log_images(out, "gallery", written, {"source": str(source), **{f"oof_dice_{c}": v for c, v in table.items()}},
                   picked)  # fmt: skip
    counts = ", ".join(f"{c}: {int((picked['class'] == c).sum())}" for c in range(1, N_CLASSES + 1))
    print(f"inspect gallery: {len(errors) // N_CLASSES} OOF images; pictured per class {counts} -> {out}")
    return list(written.values())


def log_images(out: Path, kind: str, pngs: dict[str, Path], summary: dict[str, Any],
               table: pd.DataFrame | None = None) -> str | None:  # fmt: skip
    """Log PNGs (and a table) to a W&B run in ``out`` (offline unless WANDB_MODE says otherwise); never fatal:
    returns the run id or None after a warning."""
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode == "disabled":
        return None
    try:
        import wandb

        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "steel"), name=f"inspect-{kind}",
                         job_type=f"inspect-{kind}", dir=str(out), mode=mode, reinit="finish_previous")  # fmt: skip
        logged: dict[str, Any] = {f"{kind}/{name}": wandb.Image(str(p)) for name, p in pngs.items()}
        if table is not None:
            logged[f"{kind}/worst"] = wandb.Table(dataframe=table)
        run.log(logged)
        run.summary.update(summary)
        run_id = run.id
        run.finish()
        return run_id
    except Exception as e:  # noqa: BLE001 - logging must never lose the PNGs already written
        print(f"inspect: warning: W&B logging failed ({type(e).__name__}: {e})")
        return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True, metavar="{cam,gallery}")
    c = sub.add_parser("cam", help="class activation maps of the label head for chosen images")
    c.add_argument("source", help="checkpoint, run dir or ensemble dir")
    c.add_argument("--out", default="inspect", help="output dir (cam_<image>.png)")
    c.add_argument("--images", nargs="+", default=None, help="image files, or names in DATA_DIR/train_images")
    c.add_argument("--data-dir", default=None, help="labelled data dir (default: the run's data.data_dir)")
    c.add_argument(
        "--per-class", type=int, default=1, help="default images: this many per class + defect-free"
    )
    c.add_argument("--device", default="cpu")
    c.add_argument("--no-wandb", action="store_true")
    g = sub.add_parser("gallery", help="OOF error gallery: worst FP, FN and lowest dice per class")
    g.add_argument("source", help="run or ensemble dir with oof/ and thresholds.json")
    g.add_argument("--out", default="inspect", help="output dir (gallery_class<c>.png, gallery.csv)")
    g.add_argument("--k", type=int, default=3, help="images of each kind per class")
    g.add_argument("--no-wandb", action="store_true")


def main(args: argparse.Namespace) -> int:
    if args.what == "cam":
        cam(args.source, args.out, args.images, args.data_dir, args.per_class, args.device, not args.no_wandb)
    else:
        gallery(args.source, args.out, args.k, not args.no_wandb)
    return 0
