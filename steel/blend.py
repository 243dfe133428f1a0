"""Ensembles: TTA flips, fold/member averaging (mean, temperature, weights), blends of OOF stores and
checkpoint weight averaging.

One definition of the ensemble forward serves OOF prediction (``predict_batch``), eager prediction
(``steel predict DIR``) and the exported TorchScript file (``steel export``): ``Member`` (the fold nets of one
run, its input size and TTA) and ``Ensemble`` (members, blending, tuned post-processing) are nn.Modules
that are run as they are or ``torch.jit.script``-ed around traced fold nets.

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

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from steel import N_CLASSES
from steel.errors import SteelError
from steel.postprocess import postprocess_torch

ENSEMBLE_FILE = "ensemble.yaml"
MODES = ("mean", "temperature")

TTA: dict[str, tuple] = {
    "none": (lambda x: x, lambda y: y),
    "hflip": (lambda x: x.flip(-1), lambda y: y.flip(-1)),
    "vflip": (lambda x: x.flip(-2), lambda y: y.flip(-2)),
}


def parse_tta(spec: str | list[str] | None) -> list[str]:
    """'none,hflip,vflip' -> ['none', 'hflip', 'vflip']; SteelError for an unknown name."""
    names = [
        t.strip() for t in (spec.split(",") if isinstance(spec, str) else (spec or ["none"])) if t.strip()
    ]
    bad = [t for t in names if t not in TTA]
    if bad:
        raise SteelError(f"unknown TTA {bad[0]!r}; choose from {', '.join(TTA)}")
    if len(set(names)) != len(names):
        raise SteelError(f"TTA {','.join(names)}: a transform is listed twice")
    return names or ["none"]


# ---- the ensemble forward (eager and TorchScript) -------------------------------------------------------
class Member(nn.Module):
    """The fold nets of one run: x float (B, 1, H, W) in [0, 1] -> (mask probs (B, 4, H, W), class probs (B, 4)).

    Each fold net sees the image resized (bilinear) to ``input_size`` (or padded to multiples of 32 when None),
    its sigmoid outputs are averaged over the TTA flips (flipped back), the maps resized back to (H, W) and
    raised to ``power``; the result is the mean over the folds.
    """

    input_size: list[int] | None
    tta: list[str]
    power: float

    def __init__(
        self,
        nets: list[nn.Module],
        input_size: list[int] | tuple[int, int] | None = None,
        tta: list[str] | tuple[str, ...] = ("none",),
        power: float = 1.0,
    ) -> None:
        super().__init__()
        if not nets:
            raise SteelError("a member needs at least one fold net")
        self.nets = nn.ModuleList(nets)
        self.input_size = [int(v) for v in input_size] if input_size is not None else None
        self.tta = parse_tta(list(tta))
        self.power = float(power)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2], x.shape[-1]
        size = self.input_size
        if size is not None and (size[0] != h or size[1] != w):
            xin = F.interpolate(x, size=(size[0], size[1]), mode="bilinear", align_corners=False)
        else:
            ph, pw = (32 - h % 32) % 32, (32 - w % 32) % 32
            xin = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph > 0 or pw > 0 else x
        n_tta = float(len(self.tta))
        masks = torch.zeros(0, device=x.device)
        cls = torch.zeros(0, device=x.device)
        first = True
        for net in self.nets:
            fold_masks = torch.zeros(0, device=x.device)
            fold_cls = torch.zeros(0, device=x.device)
            first_tta = True
            for name in self.tta:
                xi = xin
                if name == "hflip":
                    xi = xin.flip(-1)
                elif name == "vflip":
                    xi = xin.flip(-2)
                out = net(xi)
                p = torch.sigmoid(out["mask"].float())
                if name == "hflip":
                    p = p.flip(-1)
                elif name == "vflip":
                    p = p.flip(-2)
                c = torch.sigmoid(out["label"].float())
                if first_tta:
                    fold_masks, fold_cls, first_tta = p, c, False
                else:
                    fold_masks, fold_cls = fold_masks + p, fold_cls + c
            fold_masks, fold_cls = fold_masks / n_tta, fold_cls / n_tta
            if fold_masks.shape[-2] != h or fold_masks.shape[-1] != w:
                if size is not None and (size[0] != h or size[1] != w):
                    fold_masks = F.interpolate(fold_masks, size=(h, w), mode="bilinear", align_corners=False)
                else:
                    fold_masks = fold_masks[..., :h, :w]
            if self.power != 1.0:
                fold_masks, fold_cls = fold_masks.pow(self.power), fold_cls.pow(self.power)
            if first:
                masks, cls, first = fold_masks, fold_cls, False
            else:
                masks, cls = masks + fold_masks, cls + fold_cls
        k = float(len(self.nets))
        return masks / k, cls / k


class Ensemble(nn.Module):
    """Members + blending + the tuned post-processing, on uint8 images.

    forward(images uint8 (B, H, W) grey or (B, H, W, 3) RGB) -> (masks bool (B, 4, H, W), class probs
    float32 (B, 4), blended mask probs float32 (B, 4, H, W)). RGB is converted to grey like OpenCV
    (fixed point: (9798 R + 19235 G + 3735 B + 16384) >> 15, bit-exact with cv2.cvtColor RGB2GRAY).
    """

    weights: list[float]
    soft: bool

    def __init__(self, members: list[Member], weights: list[float] | None = None, params: Any = None) -> None:
        super().__init__()
        from steel.postprocess import Params

        self.members = nn.ModuleList(members)
        self.weights = normalise_weights(weights, len(members))
        params = params if params is not None else Params.uniform()
        arr = params.arrays()
        self.register_buffer("label_thr", torch.tensor(arr["label"], dtype=torch.float32))
        self.register_buffer("pixel_thr", torch.tensor(arr["pixel"], dtype=torch.float32))
        self.register_buffer("min_area", torch.tensor(arr["min_area"], dtype=torch.float64))
        self.register_buffer("min_component", torch.tensor(arr["min_component"], dtype=torch.float64))
        self.soft = params.mode == "soft"

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W) or (B, H, W, 3) -> float (B, 1, H, W) in [0, 1]."""
        if images.dtype != torch.uint8:
            raise RuntimeError("steel ensemble: images must be uint8 (B, H, W) grey or (B, H, W, 3) RGB")
        if images.dim() == 4 and images.shape[-1] == 3:
            rgb = images.to(torch.int32)
            grey = (rgb[..., 0] * 9798 + rgb[..., 1] * 19235 + rgb[..., 2] * 3735 + 16384) >> 15
            return (grey.float() / 255.0).unsqueeze(1)
        if images.dim() == 3:
            return (images.float() / 255.0).unsqueeze(1)
        raise RuntimeError("steel ensemble: images must be uint8 (B, H, W) grey or (B, H, W, 3) RGB")

    def probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x float (B, 1, H, W) in [0, 1] -> blended (mask probs (B, 4, H, W), class probs (B, 4))."""
        masks = torch.zeros(0, device=x.device)
        cls = torch.zeros(0, device=x.device)
        i = 0
        for member in self.members:
            m, c = member(x)
            wt = self.weights[i]
            if i == 0:
                masks, cls = m * wt, c * wt
            else:
                masks, cls = masks + m * wt, cls + c * wt
            i += 1
        return masks, cls

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs, cls = self.probs(self.to_input(images))
        masks = postprocess_torch(
            probs, cls, self.label_thr, self.pixel_thr, self.min_area, self.min_component, self.soft, 1
        )
        return masks, cls, probs


@torch.no_grad()
def predict_batch(
    net: torch.nn.Module,
    x: torch.Tensor,
    input_size: tuple[int, int] | list[int] | None = None,
    tta: list[str] = ("none",),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask probs (B, 4, H, W) and class probs (B, 4) of one net on x (B, 1, H, W) float in [0, 1].

    The ``Member`` forward of a single fold (resize to ``input_size`` or pad to 32, TTA mean, resize back),
    so OOF stores, eager prediction and exported files compute the same thing.
    """
    return Member([net], input_size, list(tta))(x)


def normalise_weights(weights: list[float] | None, n: int) -> list[float]:
    """Member weights normalised to sum 1 (None: equal); SteelError for a wrong count or bad values."""
    if weights is None:
        return [1.0 / n] * n
    w = [float(v) for v in weights]
    if len(w) != n:
        raise SteelError(f"--weights has {len(w)} values for {n} members")
    if any(not np.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
        raise SteelError(
            f"--weights {','.join(map(str, weights))}: need finite values >= 0 with a positive sum"
        )
    return [v / sum(w) for v in w]


def parse_weights(spec: str | None) -> list[float] | None:
    """'1,2,1' -> [1.0, 2.0, 1.0]; SteelError if not numbers."""
    if spec is None:
        return None
    try:
        return [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise SteelError(f"--weights {spec!r}: expected comma-separated numbers, e.g. 1,2,1") from None


# ---- run and ensemble directories -----------------------------------------------------------------------
def _fold_checkpoints(run_dir: Path, name: str = "best.ckpt") -> list[Path]:
    """fold-K/<name> for every fold of RUN_DIR/folds.csv (or of the fold-K dirs); SteelError if one is missing."""
    from steel.folds import load_folds

    if (run_dir / "folds.csv").is_file():
        n = int(load_folds(run_dir / "folds.csv")["fold"].max()) + 1
    else:
        n = len(list(run_dir.glob("fold-*/")))
    if n == 0:
        raise SteelError(f"{run_dir}: not a run dir (no folds.csv, no fold-K/ dirs)")
    ckpts = [run_dir / f"fold-{k}" / name for k in range(n)]
    missing = [c for c in ckpts if not c.is_file()]
    if missing:
        raise SteelError(f"{missing[0]}: checkpoint missing ({len(missing)} of {n} folds)")
    return ckpts


def run_member(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Member description of a run dir: the checkpoints and TTA its OOF store was made with (best.ckpt / none
    when it has no store), its OOF dir, and the image size."""
    from steel.oof import OOFStore

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
        ckpts = _fold_checkpoints(run_dir, ckpts[0].name if ckpts else "best.ckpt")
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
    import yaml

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
    from steel.module import load_model
    from steel.postprocess import Params

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
    from tqdm import tqdm

    from steel.oof import OOFWriter

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
    import yaml

    from steel.io import write_text
    from steel.oof import OOFStore, build_oof

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
            from steel.module import average_checkpoints

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
    stale = out / "thresholds.json"
    if stale.is_file():
        stale.unlink()
        print(f"blend: removed {stale} (tuned on the previous blend)")
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
    return 0
