"""Blends of runs: ensemble specs (run dirs, ensemble.yaml) -> ``steel.ensemble.Ensemble``, OOF blending and
checkpoint weight averaging.

The ensemble forward itself (``Member``: the fold nets of one run, its input size and TTA; ``Ensemble``:
members, blending, tuned post-processing) lives in ``steel.ensemble``, the one inference path that OOF
prediction, validation, eager prediction (``steel predict DIR``) and the export share.

Blending rule (the same for the OOF blend and for prediction): a fold model's probabilities are averaged
over its TTA at the model input size, resized back to the image size, then raised to the power ``t``
(``mode: temperature``; t = 1 for ``mean``); a member is the mean over its folds and the ensemble the
weighted mean of its members (weights normalised to sum 1). In the OOF every member row comes from the
member's fold model that held the image out, so blending rows is exactly "each image scored by the models
that did not train on it".

``steel blend RUN_DIR [RUN_DIR ...] --out DIR`` writes DIR/oof/ (an OOF store, so ``steel sweep DIR``
tunes thresholds for the blend) and DIR/ensemble.yaml (members, fold checkpoints, TTA, mode, weights).
The blended OOF always reflects exactly the checkpoints and TTA in ensemble.yaml: a member whose stored OOF
was made with another TTA (``--tta``) or whose folds are weight-averaged (``--average-top-k``) gets its OOF
recomputed into DIR/members/<i>-<name>/oof; the member's own run dir is never modified.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from steel import N_CLASSES
from steel.ensemble import Ensemble, Member, normalise_weights, parse_tta
from steel.errors import SteelError
from steel.io import atomic_path, write_text
from steel.module import load_model
from steel.oof import OOFStore, OOFWriter, build_oof
from steel.postprocess import THRESHOLDS_FILE, Params
from steel.rundir import fold_checkpoints

ENSEMBLE_FILE = "ensemble.yaml"
MODES = ("mean", "temperature")  # blending modes (gating modes are steel.postprocess.MODES)


def parse_weights(spec: str | None) -> list[float] | None:
    """'1,2,1' -> [1.0, 2.0, 1.0]; SteelError if not numbers."""
    if spec is None:
        return None
    try:
        return [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise SteelError(f"--weights {spec!r}: expected comma-separated numbers, e.g. 1,2,1") from None


# ---- run and ensemble directories -----------------------------------------------------------------------
def run_member(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Member description of a run dir: the checkpoints and TTA its OOF store was made with (best.ckpt / none
    when it has no store), its OOF dir, and the image size."""
    run_dir = Path(run_dir).resolve()
    if (run_dir / ENSEMBLE_FILE).is_file():
        raise SteelError(
            f"{run_dir}: is an ensemble dir; blend its members (see its {ENSEMBLE_FILE}) instead"
        )
    meta: dict[str, Any] = {}
    if (run_dir / "oof" / "meta.json").is_file():
        meta = OOFStore(run_dir).meta
    ckpts = [Path(c) for c in meta.get("checkpoints") or []]
    if not ckpts or not all(c.is_file() for c in ckpts):  # a moved run dir: same file names under fold-K/
        ckpts = fold_checkpoints(run_dir, ckpts[0].name if ckpts else "best.ckpt")
    size = [int(meta["height"]), int(meta["width"])] if "height" in meta else None
    oof = str(run_dir / "oof") if meta else None
    return {
        "run_dir": str(run_dir),
        "checkpoints": [str(c) for c in ckpts],
        "tta": parse_tta(meta.get("tta")),
        "oof": oof,
        "image_size": size,
    }


def ensemble_spec(path: str | os.PathLike) -> dict[str, Any]:
    """What to build from a run dir or an ensemble dir: {"kind", "source", "members": [{"run_dir",
    "checkpoints", "tta", "weight"}], "mode", "temperature", "image_size" [H, W] or None}."""
    path = Path(path)
    if not path.is_dir():
        raise SteelError(f"{path}: not a directory (expected a run dir or an ensemble dir)")
    file = path / ENSEMBLE_FILE
    if file.is_file():
        try:
            spec = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise SteelError(f"{file}: not valid YAML ({str(e).splitlines()[0]})") from None
        members = spec.get("members")
        if not isinstance(members, list) or not members:
            raise SteelError(f"{file}: no 'members' list")
        for i, m in enumerate(members):
            if not isinstance(m, dict) or not m.get("checkpoints"):
                raise SteelError(f"{file}: member {i} has no 'checkpoints'")
            missing = [c for c in m["checkpoints"] if not Path(c).is_file()]
            if missing:
                raise SteelError(f"{file}: member {i}: checkpoint {missing[0]} not found")
            m["tta"] = parse_tta(m.get("tta"))
        mode = spec.get("mode", "mean")
        if mode not in MODES:
            raise SteelError(f"{file}: mode {mode!r} is not one of {', '.join(MODES)}")
        try:
            weights = normalise_weights([float(m.get("weight", 1.0)) for m in members], len(members))
            temperature = float(spec.get("temperature", 1.0)) if mode == "temperature" else 1.0
        except (TypeError, ValueError) as e:
            raise SteelError(f"{file}: bad weight or temperature ({e})") from None
        if not (np.isfinite(temperature) and temperature > 0):
            raise SteelError(f"{file}: temperature {temperature} must be > 0")
        for i, (m, wt) in enumerate(zip(members, weights)):
            m["weight"] = wt
            m.setdefault("run_dir", f"member {i}")
        return {"kind": "ensemble", "source": str(path.resolve()), "members": members, "mode": mode,
                "temperature": temperature, "image_size": spec.get("image_size")}  # fmt: skip
    m = run_member(path)
    m["weight"] = 1.0
    return {
        "kind": "run",
        "source": m["run_dir"],
        "members": [m],
        "mode": "mean",
        "temperature": 1.0,
        "image_size": m["image_size"],
    }


def build_ensemble(
    path: str | os.PathLike, device: str | torch.device = "cpu", params: Any = None
) -> tuple[Ensemble, dict[str, Any]]:
    """Eager Ensemble (eval mode) of a run dir or an ensemble dir with its thresholds.json, and its spec
    (``ensemble_spec`` plus per member "input_size", "in_channels", "arch", "encoder")."""
    spec = ensemble_spec(path)
    params = Params.load(path) if params is None else params
    members = []
    for m in spec["members"]:
        nets, sizes, hps = [], set(), []
        for ck in m["checkpoints"]:
            model = load_model(ck, map_location=device)
            nets.append(model.net)
            sizes.add(model.input_size)
            hps.append(model.hparams)
        if len(sizes) > 1:
            raise SteelError(f"{m['run_dir']}: folds have different input sizes {sorted(map(str, sizes))}")
        size = sizes.pop()
        m.update(input_size=list(size) if size else None, in_channels=int(hps[0].get("in_channels", 1)),
                 arch=str(hps[0].get("arch")), encoder=str(hps[0].get("encoder")))  # fmt: skip
        members.append(Member(nets, size, m["tta"], spec["temperature"]))
    ens = Ensemble(members, [m["weight"] for m in spec["members"]], params).to(device).eval()
    return ens, spec


# ---- checkpoint weight averaging ------------------------------------------------------------------------
def average_checkpoints(paths: list[str | Path], out: str | Path, template: str | Path | None = None) -> Path:
    """Average the float weights of checkpoints (12th place trick) into ``out`` (a full checkpoint: the
    template's, default the first path's, with the averaged state_dict; its fold/split record included)."""
    if not paths:
        raise SteelError("no checkpoints to average")
    states = [torch.load(p, map_location="cpu", weights_only=False)["state_dict"] for p in paths]
    ckpt = torch.load(template or paths[0], map_location="cpu", weights_only=False)
    avg = {}
    for key, value in states[0].items():
        if torch.is_floating_point(value):
            avg[key] = torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype)
        else:
            avg[key] = ckpt["state_dict"][key]
    ckpt["state_dict"] = avg
    with atomic_path(out, ".ckpt") as tmp:
        torch.save(ckpt, tmp)
    return Path(out)


def topk_checkpoints(fold_dir: Path, k: int) -> list[Path]:
    """The k best checkpoints of fold_dir/topk/ (scores from last.ckpt's ModelCheckpoint state when there are
    more than k files); SteelError when the fold has fewer than k."""
    files = sorted((fold_dir / "topk").glob("*.ckpt"))
    if len(files) < k:
        raise SteelError(
            f"{fold_dir}: {len(files)} top-k checkpoints in topk/, need {k} (train with --average_top_k {k})"
        )
    if len(files) == k:
        return files
    scores: dict[str, float] = {}
    last = fold_dir / "last.ckpt"
    if last.is_file():
        state = torch.load(last, map_location="cpu", weights_only=False).get("callbacks") or {}
        for key, value in state.items():
            if (
                key.startswith("ModelCheckpoint")
                and isinstance(value, dict)
                and str(value.get("dirpath", "")).endswith("topk")
            ):
                scores.update({Path(p).name: float(s) for p, s in (value.get("best_k_models") or {}).items()})
    ranked = [f for f in files if f.name in scores]
    if len(ranked) < k:
        raise SteelError(
            f"{fold_dir}/topk: {len(files)} checkpoints but no scores for them in last.ckpt; pass --average-top-k {len(files)}"
        )
    return sorted(ranked, key=lambda f: -scores[f.name])[:k]


# ---- OOF blending ---------------------------------------------------------------------------------------
def check_compatible(stores: list[Any], names: list[str]) -> None:
    """SteelError naming the first mismatch of ids, folds, stride or image size between OOF stores."""
    ref, a = stores[0], names[0]
    for st, b in zip(stores[1:], names[1:]):
        for attr in ("stride", "height", "width"):
            if getattr(st, attr) != getattr(ref, attr):
                raise SteelError(
                    f"OOF {attr} differs: {a} has {getattr(ref, attr)}, {b} has {getattr(st, attr)}"
                )
        if len(st) != len(ref):
            extra = sorted(set(ref.ids) ^ set(st.ids))
            raise SteelError(
                f"OOF images differ: {a} has {len(ref)}, {b} has {len(st)} (e.g. {extra[0] if extra else '?'})"
            )
        if st.ids != ref.ids:
            i = next(i for i, (x, y) in enumerate(zip(ref.ids, st.ids)) if x != y)
            raise SteelError(f"OOF images differ: row {i} is {ref.ids[i]} in {a} but {st.ids[i]} in {b}")
        diff = np.flatnonzero(np.asarray(st.folds) != np.asarray(ref.folds))
        if diff.size:
            i = int(diff[0])
            raise SteelError(
                f"OOF folds differ: {ref.ids[i]} is fold {ref.folds[i]} in {a} but fold {st.folds[i]} in {b} (same folds.csv needed)"
            )


def blend_stores(
    stores: list[Any], weights: list[float], power: float, out_dir: str | os.PathLike, meta: dict[str, Any] | None = None,
    chunk_mb: float = 64, check_truth: bool = False,
) -> Path:  # fmt: skip
    """Write the weighted mean of the stores' f(p) = p**power (masks and cls) as a new OOF store ``out_dir``.

    Streams rows in chunks of ~``chunk_mb`` float32 per member (dequantise, blend, requantise on write).
    ``check_truth``: compare every member's truth with the first's (SteelError naming the first bad image).
    """
    ref = stores[0]
    n = len(ref)
    row_bytes = 4 * int(np.prod(ref.masks.shape[1:]))
    step = max(1, int(chunk_mb * 2**20 // max(1, row_bytes)))
    with OOFWriter(out_dir, ref.ids, ref.folds, ref.height, ref.width, ref.stride, meta) as writer:
        for start in tqdm(range(0, n, step), desc="blend", unit="chunk", disable=n <= step):
            sl = slice(start, min(n, start + step))
            masks = np.zeros((sl.stop - sl.start, *ref.masks.shape[1:]), np.float32)
            cls = np.zeros((sl.stop - sl.start, N_CLASSES), np.float32)
            for st, wt in zip(stores, weights):
                p = np.asarray(st.masks[sl], dtype=np.float32) / np.float32(255)
                c = np.asarray(st.cls[sl], dtype=np.float32)
                if power != 1.0:
                    p, c = np.power(p, np.float32(power)), np.power(c, np.float32(power))
                masks += np.float32(wt) * p
                cls += np.float32(wt) * c
            truth = np.asarray(ref.truth[sl])
            if check_truth:
                for st in stores[1:]:
                    bad = np.flatnonzero((np.asarray(st.truth[sl]) != truth).reshape(len(truth), -1).any(1))
                    if bad.size:
                        raise SteelError(
                            f"OOF truth differs for image {ref.ids[sl.start + int(bad[0])]} (members built from different labels)"
                        )
            writer.write(np.arange(sl.start, sl.stop), cls, np.clip(masks, 0.0, 1.0), truth)
    return Path(out_dir)


def _shadow_run(member: dict[str, Any], shadow: Path, ckpt_name: str, ckpts: list[Path]) -> Path:
    """A run dir at ``shadow`` whose fold-K/<ckpt_name> point at ``ckpts`` (symlinks unless already there),
    with the member's folds.csv and configs, so ``build_oof(shadow)`` works without touching the member."""
    run_dir = Path(member["run_dir"])
    shadow.mkdir(parents=True, exist_ok=True)
    for name in ("folds.csv", "config.yaml"):
        if (run_dir / name).is_file() and not (shadow / name).exists():
            os.symlink(run_dir / name, shadow / name)
    for k, ck in enumerate(ckpts):
        fold = shadow / f"fold-{k}"
        fold.mkdir(exist_ok=True)
        cfg = run_dir / f"fold-{k}" / "config.yaml"
        if cfg.is_file() and not (fold / "config.yaml").exists():
            os.symlink(cfg, fold / "config.yaml")
        target = fold / ckpt_name
        if Path(ck).resolve() != target.resolve():
            target.unlink(missing_ok=True)
            os.symlink(Path(ck).resolve(), target)
    return shadow


def blend(
    run_dirs: list[str | os.PathLike],
    out: str | os.PathLike,
    tta: str | list[str] | None = None,
    mode: str = "mean",
    temperature: float | None = None,
    weights: list[float] | None = None,
    average_top_k: int = 0,
    batch_size: int = 8,
    device: str | None = None,
) -> Path:
    """Blend runs into an ensemble dir ``out`` (oof/ + ensemble.yaml); see the module docstring."""
    out = Path(out).resolve()
    if not run_dirs:
        raise SteelError("no run dirs to blend")
    if mode not in MODES:
        raise SteelError(f"--mode {mode!r}: choose {' or '.join(MODES)}")
    if mode == "mean" and temperature not in (None, 1.0):
        raise SteelError("--temperature needs --mode temperature")
    t = float(2.0 if temperature is None else temperature) if mode == "temperature" else 1.0
    if not (np.isfinite(t) and t > 0):
        raise SteelError(f"--temperature {temperature}: must be > 0")
    if average_top_k < 0 or average_top_k == 1:
        raise SteelError(f"--average-top-k {average_top_k}: need 0 (off) or >= 2")
    norm = normalise_weights(weights, len(run_dirs))
    members = [run_member(r) for r in run_dirs]
    seen: dict[str, str] = {}
    for r, m in zip(run_dirs, members):
        if m["run_dir"] in seen:
            raise SteelError(f"{r}: listed twice")
        seen[m["run_dir"]] = str(r)
        if m["oof"] is None:
            raise SteelError(f"{r}: no OOF store (run `steel oof {r}` first)")
        if out == Path(m["run_dir"]) or Path(m["run_dir"]) in out.parents:
            raise SteelError(f"--out {out}: must not be (inside) the member run dir {r}")
    stores = [OOFStore(m["oof"]) for m in members]
    check_compatible(stores, [str(r) for r in run_dirs])
    want_tta = parse_tta(tta) if tta else None
    # from here on the previous blend in `out` is stale: its thresholds (tuned on the old oof/) and its
    # ensemble.yaml go first, so that a crash below cannot leave them beside a new oof/ (the old oof/ itself
    # is replaced only once the new one is complete)
    for stale in (out / THRESHOLDS_FILE, out / ENSEMBLE_FILE):
        if stale.is_file():
            stale.unlink()
            print(f"blend: removed {stale} (made for the previous blend)")

    # members whose OOF does not match what the ensemble will run get it recomputed inside `out`
    for i, (m, st) in enumerate(zip(members, stores)):
        m_tta = want_tta or m["tta"]
        if want_tta is None and average_top_k == 0:
            continue
        if average_top_k == 0 and m_tta == m["tta"]:
            continue
        shadow = out / "members" / f"{i}-{Path(m['run_dir']).name}"
        name = "best.ckpt"
        ckpts = [Path(c) for c in m["checkpoints"]]
        if average_top_k:
            name = f"avg{average_top_k}.ckpt"
            avg = []
            for k, ck in enumerate(ckpts):
                fold_dir = Path(m["run_dir"]) / f"fold-{k}"
                avg.append(
                    average_checkpoints(
                        topk_checkpoints(fold_dir, average_top_k), shadow / f"fold-{k}" / name, template=ck
                    )
                )
            ckpts = avg
        _shadow_run(m, shadow, name, ckpts)
        why = f"TTA {','.join(m_tta)}" + (f", top-{average_top_k} weight average" if average_top_k else "")
        print(f"blend: recomputing OOF of {m['run_dir']} ({why}) into {shadow / 'oof'}")
        build_oof(
            shadow,
            stride=st.stride,
            tta=m_tta,
            batch_size=batch_size,
            data_dir=st.meta.get("data_dir"),
            device=device,
            checkpoint=name,
        )
        stores[i] = OOFStore(shadow)
        m.update(
            checkpoints=[str((shadow / f"fold-{k}" / name).resolve()) for k in range(len(ckpts))],
            tta=m_tta,
            oof=str(shadow / "oof"),
            oof_recomputed=True,
        )
    check_compatible(stores, [str(r) for r in run_dirs])

    data_dirs = {st.meta.get("data_dir") for st in stores}
    ref = stores[0]
    meta = {"tta": want_tta or members[0]["tta"], "members": [m["run_dir"] for m in members], "mode": mode,
            "temperature": t, "weights": norm, "data_dir": ref.meta.get("data_dir"),
            "checkpoints": [c for m in members for c in m["checkpoints"]]}  # fmt: skip
    blend_stores(stores, norm, t, out / "oof", meta, check_truth=len(data_dirs) > 1)
    spec = {
        "members": [
            {
                "run_dir": m["run_dir"],
                "weight": wt,
                "tta": m["tta"],
                "checkpoints": m["checkpoints"],
                "oof": m["oof"],
                "oof_recomputed": bool(m.get("oof_recomputed")),
            }  # fmt: skip
            for m, wt in zip(members, norm)
        ],
        "mode": mode,
        "temperature": t,
        "weights": norm,
        "tta": want_tta,
        "average_top_k": average_top_k,
        "image_size": [ref.height, ref.width],
        "oof": {"stride": ref.stride, "n": len(ref)},
    }
    header = (
        "# steel ensemble (written by `steel blend`). oof/ blends the members' OOF made with exactly these\n"
        "# checkpoints and per-member TTA; `steel export` / `steel predict` run the same. Tune: steel sweep DIR\n"
    )
    write_text(out / ENSEMBLE_FILE, header + yaml.safe_dump(spec, sort_keys=False))
    desc = (
        f"{mode}"
        + (f" t={t:g}" if mode == "temperature" else "")
        + f", weights {','.join(f'{w:.3g}' for w in norm)}"
    )
    print(f"blend: {len(members)} members, {len(ref)} images, {desc} -> {out} (next: steel sweep {out})")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run dirs with an OOF store (steel oof) and the same folds",
    )
    p.add_argument("--out", required=True, help="ensemble dir to write (oof/, ensemble.yaml)")
    p.add_argument("--tta", default=None, help="TTA for every member, e.g. none,hflip,vflip (default: each member's OOF TTA; "
                   "members whose OOF used another TTA get their OOF recomputed)")  # fmt: skip
    p.add_argument(
        "--mode", default="mean", choices=MODES, help="mean of probabilities or temperature (mean of p**t)"
    )
    p.add_argument("--temperature", type=float, default=None, help="t of --mode temperature (default 2)")
    p.add_argument(
        "--weights", default=None, help="member weights w1,w2,... (normalised to sum 1; default equal)"
    )
    p.add_argument(
        "--average-top-k",
        type=int,
        default=0,
        help="average the K best checkpoints of each fold (fold-K/topk/) into one model",
    )
    p.add_argument("--batch-size", type=int, default=8, help="batch size when member OOF is recomputed")
    p.add_argument(
        "--device",
        default=None,
        help="cpu or cuda when member OOF is recomputed (default: cuda when available)",
    )


def main(args: argparse.Namespace) -> int:
    blend(args.run_dirs, args.out, args.tta, args.mode, args.temperature, parse_weights(args.weights), args.average_top_k,
          args.batch_size, args.device)  # fmt: skip
    from steel import tracking  # W&B lineage: the members' checkpoints -> the blend's OOF and ensemble.yaml

    tracking.log_blend(args.out, args.run_dirs)
    return 0
