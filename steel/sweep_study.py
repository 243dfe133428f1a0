"""The sweep's Optuna study, through Optuna's public API only: storages, the trials of an exact solution,
TPE over pixel threshold and component size with label and min-area solved exactly in every trial.

A study holds the search on one OOF store with one search space (study user attrs ``space`` and ``oof``
say which; another store or space is refused, so the values in one study always compare). Trials have the
16 parameters ``label_1, pixel_1, min_area_1, min_component_1, ..., min_component_4`` (TPE trials: the 8
pixel / component ones, with label and min-area in the user attrs), their objective as value and each
class's OOF Dice in the user attr ``dice``. In scaled mode each class has a ``scale_C`` parameter as well (TPE:
categorical over its grid, whose statistics are computed).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from steel import N_CLASSES
from steel.errors import SteelError
from steel.postprocess import PARAM_KEYS, ClassParams, Params
from steel.sweep_solver import Candidates, Evaluator, Solution, fold_tables, objective_value, solve

EXACT_BEST = "exact best"


# ------------------------------------------------------------------------------------------- storage
def mask_url(url: str) -> str:
    """A storage URL with its password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def default_storage(run_dir: str | os.PathLike) -> str:
    """``sqlite:///RUN_DIR/sweep.db`` (absolute path)."""
    return f"sqlite:///{Path(run_dir).resolve() / 'sweep.db'}"


def _parent_must_exist(url: str, path: str) -> None:
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise SteelError(f"--storage {mask_url(url)}: directory {parent} does not exist")


def open_storage(url: str) -> Any:
    """An Optuna storage from a URL: ``journal:///FILE`` (a journal file) or any SQLAlchemy URL (RDB:
    ``sqlite:///FILE``, ``postgresql+psycopg://USER@HOST/DB``). Nothing is created but the file or tables;
    SteelError (one line, password hidden) if it cannot be opened."""
    import optuna

    if url.startswith("journal:"):
        path = url.removeprefix("journal://")
        if path == url or not path:
            raise SteelError(f"--storage {url}: a journal storage URL looks like journal:///path/to/file.log")
        _parent_must_exist(url, path)
        from optuna.storages.journal import JournalFileBackend

        try:
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        except OSError as e:
            raise SteelError(f"--storage {url}: cannot open the journal file ({e})") from None
    if "://" not in url:
        raise SteelError(
            f"--storage {url!r} is not a storage URL (sqlite:///FILE, postgresql+psycopg://USER@HOST/DB, journal:///FILE)"
        )
    sqlite = url.startswith("sqlite")
    if sqlite:
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            _parent_must_exist(url, path)
    # SQLite: wait for another process's write instead of failing; PostgreSQL: survive dropped connections
    kwargs = {"connect_args": {"timeout": 600}} if sqlite else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SteelError(
            f"--storage {mask_url(url)}: cannot open ({type(e).__name__}: {msg[:300]})"
        ) from None


def open_study(storage: Any, url: str, name: str, attrs: dict[str, Any], sampler: Any = None) -> Any:
    """Create or load study ``name`` (maximise) and check that it was made for the same ``attrs``
    (search space and OOF store); a new study gets them as user attrs."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(
            study_name=name, storage=storage, direction="maximize", load_if_exists=True, sampler=sampler
        )
    except Exception as e:
        raise SteelError(f"--storage {mask_url(url)}: cannot create study {name!r} ({e})") from None
    have = study.user_attrs
    if not have:
        for k, v in attrs.items():
            study.set_user_attr(k, v)
        return study
    for key, what in (("space", "search space, mode or objective"), ("oof", "OOF store")):
        if have.get(key) != attrs[key]:
            raise SteelError(
                f"study {name!r} in {mask_url(url)} was made with another {what}; pass --study-name NEW"
            )
    return study


def trial_numbers(study: Any) -> list[int]:
    """Numbers of the study's finished trials."""
    from optuna.trial import TrialState

    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


# ------------------------------------------------------------------------------------- exact trials
def _exact_distributions(cfg: dict[str, Any], default: Params) -> dict[str, Any]:
    """Per parameter, the range of its grid and the default value (a grid point or the default fits)."""
    from optuna.distributions import FloatDistribution, IntDistribution

    out = {}
    for c, (dims, dp) in enumerate(zip(cfg["dims"], default.classes), 1):
        for k in default.keys():
            d, v = dims[k], getattr(dp, k)
            lo, hi = min(d.low, v), max(d.high, v)
            out[f"{k}_{c}"] = IntDistribution(int(lo), int(hi)) if d.integer else FloatDistribution(lo, hi)
    return out


def params_values(params: Params) -> dict[str, float | int]:
    """Optuna parameter values (``label_1``, ...) of a Params."""
    return {f"{k}_{c}": getattr(p, k) for c, p in enumerate(params.classes, 1) for k in params.keys()}


def record_exact(
    study: Any,
    cfg: dict[str, Any],
    ev: Evaluator,
    cands: list[Candidates],
    solution: Solution,
    tops: list[list[int]],
) -> int:
    """Add the default thresholds, the exact best and each class's runners-up (the best with that class's
    k-th best point) as finished trials -> how many were added (0 if the study already holds this best)."""
    import optuna

    mode, kind, rk = cfg["mode"], cfg["objective"], float(cfg["robust_k"])
    best = Params(tuple(c.params(m) for c, m in zip(cands, solution.choice)), mode)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get("kind") == EXACT_BEST and t.params == params_values(best):
            return 0
    default = Params.uniform(mode=mode)
    dists = _exact_distributions(cfg, default)
    rows: list[tuple[str, Params]] = [("default", default), (EXACT_BEST, best)]
    for ci, order in enumerate(tops):
        for rank, m in enumerate(order[1:], 2):
            classes = list(best.classes)
            classes[ci] = cands[ci].params(m)
            rows.append((f"class {ci + 1} #{rank}", Params(tuple(classes), mode)))
    trials = []
    for label, p in rows:
        d = ev.per_pair(p)
        value = float(objective_value(np.bincount(ev.folds.index, weights=d.sum(1)), ev.folds, kind, rk))
        attrs = {"kind": label, "dice": [float(x) for x in d.mean(0)], "oof_dice": float(d.mean())}
        trials.append(
            optuna.trial.create_trial(
                params=params_values(p), distributions=dists, value=value, user_attrs=attrs
            )
        )
    study.add_trials(trials)
    return len(trials)


# ------------------------------------------------------------------------------------------------ TPE
def _trial_seed(seed: int, number: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{number}".encode()).digest()[:4], "little")


def trial_seeded_tpe(sampler_cfg: dict[str, Any], seed: int) -> Any:
    """A TPE sampler whose random draws for trial n are seeded by (seed, n): processes sharing a study (whose
    trial numbers are unique) draw different proposals, and a re-run of the same study state repeats them."""
    import optuna

    class TrialSeededTPE(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self._for: tuple[int, Any] | None = None

        def _tpe(self, trial: Any) -> Any:
            if self._for is None or self._for[0] != trial.number:
                with warnings.catch_warnings():  # multivariate TPE is marked experimental
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    tpe = optuna.samplers.TPESampler(
                        seed=_trial_seed(seed, trial.number), constant_liar=True, **sampler_cfg
                    )
                self._for = (trial.number, tpe)
            return self._for[1]

        def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
            return self._tpe(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
            return self._tpe(trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
            return self._tpe(trial).sample_independent(study, trial, name, dist)

        def before_trial(self, study: Any, trial: Any) -> None:
            self._tpe(trial).before_trial(study, trial)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            self._tpe(trial).after_trial(study, trial, state, values)

    return TrialSeededTPE()


class TPEObjective:
    """Objective of a TPE trial: pixel threshold and component size of each class suggested as continuous
    parameters (the config's [low, high]), label and min-area then solved exactly over their grids."""

    def __init__(self, ev: Evaluator, cfg: dict[str, Any]) -> None:
        self.ev, self.cfg = ev, cfg

    def solve(
        self, pixel: list[float], comp: list[float], scale: list[float] | None = None
    ) -> tuple[Params, float]:
        """Best thresholds and objective for per-class pixel thresholds, component sizes (and scales) (4,)."""
        ev, cfg = self.ev, self.cfg
        scale = scale or [0.0] * len(pixel)
        cands = []
        for c, dims in enumerate(cfg["dims"]):
            area, inter = ev.kept(c, pixel[c], comp[c], cfg["mode"], scale[c])
            labels = np.asarray(dims["label"].values(), np.float64)
            areas = np.asarray(dims["min_area"].values(), np.float64)
            sums = fold_tables(area, inter, ev.true_area[c], ev.stats.cls[:, c], ev.folds, labels, areas)
            lab, ar = np.meshgrid(labels, areas, indexing="ij")
            m = lab.size
            cands.append(
                Candidates(
                    sums.reshape(m, -1),
                    np.full(m, pixel[c]),
                    np.full(m, comp[c]),
                    lab.ravel(),
                    ar.ravel(),
                    np.full(m, float(scale[c])),
                )
            )
        sol = solve(cands, ev.folds, cfg["objective"], float(cfg["robust_k"]))
        return Params(tuple(c.params(m) for c, m in zip(cands, sol.choice)), cfg["mode"]), sol.value

    def __call__(self, trial: Any) -> float:
        pixel, comp, scale = [], [], []
        for c, dims in enumerate(self.cfg["dims"], 1):
            p, k = dims["pixel"], dims["min_component"]
            pixel.append(trial.suggest_float(f"pixel_{c}", p.low, p.high))
            comp.append(trial.suggest_float(f"min_component_{c}", float(k.low), float(k.high)))
            if self.cfg["mode"] == "scaled":  # only the scales the statistics were computed for
                scale.append(
                    trial.suggest_categorical(f"scale_{c}", [float(v) for v in dims["scale"].values()])
                )
        params, value = self.solve(pixel, comp, scale or None)
        for c, p in enumerate(params.classes, 1):
            trial.set_user_attr(f"label_{c}", p.label)
            trial.set_user_attr(f"min_area_{c}", p.min_area)
        trial.set_user_attr("dice", [float(x) for x in self.ev.per_pair(params).mean(0)])
        return value


def run_tpe(
    study: Any, objective: TPEObjective, trials: int, first: list[Params], progress: bool = True
) -> bool:
    """Add ``trials`` TPE trials to ``study`` (``first``: pixel / component values to try first in a new
    study) -> True if interrupted (Ctrl-C); the finished trials stay."""
    if not study.trials:
        for p in first:
            values = {}
            for c, (cp, dims) in enumerate(zip(p.classes, objective.cfg["dims"]), 1):
                for k in ("pixel", "min_component"):
                    values[f"{k}_{c}"] = float(np.clip(getattr(cp, k), dims[k].low, dims[k].high))
                if objective.cfg["mode"] == "scaled":  # the grid's scale nearest to it
                    grid = np.array([float(v) for v in dims["scale"].values()])
                    values[f"scale_{c}"] = float(grid[np.abs(grid - cp.scale).argmin()])
            study.enqueue_trial(values, skip_if_exists=True)
    try:
        study.optimize(objective, n_trials=trials, show_progress_bar=progress and trials > 0)
    except KeyboardInterrupt:
        return True
    return False


def params_of_trial(trial: Any, mode: str) -> Params:
    """Thresholds of a finished trial (exact: its 16 parameters; TPE: 8 parameters + label / min-area attrs;
    scaled mode: and a scale per class)."""
    solved = {k: v for k, v in trial.user_attrs.items() if k.rsplit("_", 1)[0] in ("label", "min_area")}
    values = {**trial.params, **solved}
    keys = (*PARAM_KEYS, "scale") if mode == "scaled" else PARAM_KEYS
    out = []
    for c in range(1, N_CLASSES + 1):
        out.append(ClassParams(**{k: values[f"{k}_{c}"] for k in keys}))
    return Params(tuple(out), mode)
