import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from steel import sweep
from steel.errors import SteelError
from steel.oof import OOFStore
from steel.postprocess import ClassParams, Params
from steel.sweep import (
    DEFAULT_CONFIG,
    FastDice,
    brute_force_dice,
    compute_stats,
    level_index,
    load_config,
    load_or_compute_stats,
    params_from_trial,
    sweep_grids,
    write_synthetic_oof,
)
from tests.conftest import run_steel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def oof_root(tmp_path_factory) -> Path:
    """A synthetic OOF store of 64 images 64x320 at stride 2, 3 folds."""
    root = tmp_path_factory.mktemp("sweep")
    write_synthetic_oof(root / "oof", 64, height=64, width=320, stride=2, n_folds=3, seed=5)
    return root / "oof"


@pytest.fixture
def run_dir(tmp_path, oof_root) -> Path:
    """A fresh run dir whose oof/ is the shared store."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "oof").symlink_to(oof_root)
    return tmp_path / "run"


def vars_of(p: Params) -> dict:
    """Optuna parameter values (``label_1``, ...) of a Params."""
    return {
        f"{k}_{c}": getattr(cp, k)
        for c, cp in enumerate(p.classes, 1)
        for k in ("label", "pixel", "min_area", "min_component")
    }


def random_params(cfg, rng) -> Params:
    vals = {
        f"{k}_{c}": d.value(int(rng.integers(d.n)))
        for c, dims in enumerate(cfg["dims"], 1)
        for k, d in dims.items()
    }
    return params_from_trial(vals, cfg)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_fast_dice_equals_brute_force(oof_root, mode):
    store = OOFStore(oof_root)
    cfg = load_config(None)
    cfg["mode"] = mode
    pixel, comp = sweep_grids(cfg)
    stats = compute_stats(store, pixel, comp, mode, chunk=16, progress=False)
    fast = FastDice(stats, np.asarray(store.cls), store.folds)
    rng = np.random.default_rng(0)
    n_comp_active = n_area_active = 0
    for _ in range(100):
        p = random_params(cfg, rng)
        f = fast.per_pair(p)
        assert np.abs(f - brute_force_dice(store, p)).max() <= 1e-9
        assert abs(fast.summary(p)["mean"] - brute_force_dice(store, p).mean()) <= 1e-9
        no_comp = Params(tuple(ClassParams(c.label, c.pixel, c.min_area, 0) for c in p.classes), mode)
        no_area = Params(tuple(ClassParams(c.label, c.pixel, 0, c.min_component) for c in p.classes), mode)
        n_comp_active += not np.array_equal(fast.per_pair(no_comp), f)
        n_area_active += not np.array_equal(fast.per_pair(no_area), f)
    assert n_comp_active > 30 and n_area_active > 30  # components and min-area really change the result
    # off-grid pixel thresholds (no component removal) go through the histograms
    for t in (0.5, 0.123, 0.77):
        p = Params.uniform(0.4, t, 300, 0, mode)
        assert np.abs(fast.per_pair(p) - brute_force_dice(store, p)).max() <= 1e-9
    with pytest.raises(ValueError, match="not in the precomputed grid"):
        fast.per_pair(Params.uniform(0.5, 0.123, 0, 100, mode))


def test_level_index_matches_thresholding():
    q = np.arange(256, dtype=np.uint8)
    prob = q.astype(np.float32) / 255.0  # as OOFStore.probs
    pix = np.array([0.0, 0.3, 0.5, 0.55, 0.6, 1 / 3, 0.7, 1.0])
    for t, i in zip(pix, level_index(pix)):
        assert (prob >= np.float32(t)).argmax() == i and (prob[i:] >= np.float32(t)).all()
    cls = np.array([[0.0, 0.3, 0.55, 1.0]], np.float32)
    soft = level_index(pix, cls)
    for c in range(4):
        for j, t in enumerate(pix):
            assert soft[0, c, j] == int(((prob * cls[0, c]) < np.float32(t)).sum())


def test_stats_cache_and_parallel_precompute(oof_root, monkeypatch, tmp_path):
    store = OOFStore(oof_root)
    pixel, comp = np.array([0.4, 0.6]), np.array([0.0, 100.0])
    stats, path = load_or_compute_stats(store, pixel, comp, "hard", progress=False)
    assert path.parent == oof_root and path.name.startswith("stats-") and path.suffix == ".npz"
    par = compute_stats(store, pixel, comp, "hard", workers=2, chunk=30, progress=False)
    for k in ("ge_all", "ge_true", "kept_area", "kept_inter"):
        assert np.array_equal(stats[k], par[k])

    def boom(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(sweep, "compute_stats", boom)
    again, path2 = load_or_compute_stats(store, pixel, comp, "hard", progress=False)
    assert path2 == path and np.array_equal(again["kept_area"], stats["kept_area"])
    with pytest.raises(AssertionError, match="recomputed"):  # another grid is another cache file
        load_or_compute_stats(store, np.array([0.45]), comp, "hard", progress=False)


def test_robust_objective(oof_root):
    store = OOFStore(oof_root)
    stats = compute_stats(store, np.array([0.5]), np.array([0.0]), progress=False)
    fast = FastDice(stats, np.asarray(store.cls), store.folds)
    d = brute_force_dice(store, Params.uniform())
    per_class = [fast.class_dice_at(c, 0.5, 0, 0, 0) for c in range(4)]
    fold_means = np.array([d[store.folds == f].mean() for f in np.unique(store.folds)])
    assert abs(fast.score(per_class, "mean") - d.mean()) < 1e-12
    assert abs(fast.score(per_class, "robust", 2.0) - (fold_means.mean() - 2.0 * fold_means.std())) < 1e-12


def test_configs(tmp_path):
    assert yaml.safe_load((ROOT / "sweeps" / "default.yaml").read_text()) == DEFAULT_CONFIG
    wide = load_config(ROOT / "sweeps" / "wide.yaml")
    assert len(sweep_grids(wide)[0]) > len(sweep_grids(load_config(None))[0])
    ok = tmp_path / "ok.yaml"
    ok.write_text("trials: 5\nobjective: robust\nclasses:\n  4: {min_area: {high: 6000, step: 200}}\n")
    cfg = load_config(ok)  # a partial override inherits the rest of the dimension
    assert (
        cfg["dims"][3]["min_area"] == sweep.Dim(0, 6000, 200, True)
        and cfg["dims"][0]["min_area"].high == 3000
    )
    assert cfg["objective"] == "robust" and cfg["dims"][2]["pixel"].values()[0] == 0.3

    def bad(text, match):
        f = tmp_path / "bad.yaml"
        f.write_text(text)
        with pytest.raises(SteelError, match=match):
            load_config(f)

    bad("trails: 5\n", "unknown key 'trails'")
    bad(
        "space:\n  label: {low: 0.3, high: 1.2, step: 0.1}\n",
        r"label range \[0.3, 1.2\] must lie in \[0, 1\]",
    )
    bad("space:\n  pixel: {low: 0.7, high: 0.3, step: 0.05}\n", "low <= high")
    bad("space:\n  min_area: {low: 0, high: 3000, step: 70}\n", "not a multiple of step")
    bad("space:\n  min_area: {low: 0, high: 30.5, step: 0.5}\n", "whole pixel counts")
    bad("space:\n  colour: {low: 0, high: 1, step: 1}\n", "space key 'colour'")
    bad("classes:\n  5: {}\n", "classes key '5'")
    bad("objective: median\n", "objective 'median'")
    bad("mode: fuzzy\n", "mode 'fuzzy'")
    bad("sampler: {batch: 0}\n", "sampler batch 0 must be an integer >= 1")
    bad("sampler: {multivariate: 1}\n", "sampler multivariate 1 must be true or false")
    bad("sampler: {liar: true}\n", "unknown sampler key 'liar'")
    bad("[1, 2\n", "not valid YAML")
    with pytest.raises(SteelError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def steel_main(*args) -> int:
    """The `steel` command line in this process (faster than a subprocess where the exit path is not tested)."""
    from steel.cli import main

    return main([str(a) for a in args])


def study_trials(url: str, name: str) -> list:
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def test_cli_sweep_writes_thresholds_png_study_and_reruns(run_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    proc = run_steel("sweep", run_dir, "--trials", 12, "--seed", 1)
    assert "OOF dice" in proc.stdout and "class 4" in proc.stdout
    out = json.loads((run_dir / "thresholds.json").read_text())
    best = Params.load(run_dir)
    assert out["trials"] == 12 and out["stride"] == 2 and out["mode"] == "hard"
    assert set(out["classes"]["1"]) == {"label", "pixel", "min_area", "min_component"}
    assert out["default_params"] == Params.uniform().to_dict()
    store = OOFStore(run_dir)
    bf = brute_force_dice(store, best)
    assert abs(out["oof_dice"]["mean"] - bf.mean()) < 1e-9
    assert np.allclose(out["oof_dice"]["per_class"], bf.mean(0), atol=1e-9)
    dflt = brute_force_dice(store, Params.uniform())
    assert abs(out["default_dice"]["mean"] - dflt.mean()) < 1e-9
    assert out["oof_dice"]["mean"] >= out["default_dice"]["mean"]  # trial 0 is the default
    assert (run_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out["wandb_run_id"] and list((run_dir / "wandb").glob("offline-run-*"))
    url = f"sqlite:///{run_dir.resolve() / 'sweep.db'}"
    assert len(study_trials(url, "thresholds-default")) == 12

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert steel_main("sweep", run_dir, "--trials", 5) == 0  # same study, 5 more; statistics from the cache
    trials = study_trials(url, "thresholds-default")
    assert len(trials) == 17 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert json.loads((run_dir / "thresholds.json").read_text())["trials"] == 17


def test_cli_sweep_two_workers_sqlite_and_journal(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = tmp_path / "soft.yaml"
    cfg.write_text("mode: soft\nobjective: robust\nrobust_k: 0.5\nsampler: {n_startup_trials: 5}\n")
    proc = run_steel("sweep", run_dir, "--config", cfg, "--trials", 14, "--workers", 2)
    assert "warning" not in proc.stderr  # the batched insert worked (no fall-back to one trial at a time)
    url = f"sqlite:///{run_dir.resolve() / 'sweep.db'}"
    trials = study_trials(url, "thresholds-soft")
    assert len(trials) == 14 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(14))
    out = json.loads((run_dir / "thresholds.json").read_text())
    assert out["mode"] == "soft" and out["objective"] == "robust" and out["trials"] == 14
    journal = tmp_path / "j" / "sweep.log"
    run_steel("sweep", run_dir, "--trials", 6, "--storage", f"journal://{journal}", "--study-name", "j")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    assert len(optuna.load_study(study_name="j", storage=storage).trials) == 6
    assert json.loads((run_dir / "thresholds.json").read_text())["study_name"] == "j"


def steel_in_process(capsys, *args) -> tuple[int, str]:
    from steel.cli import main

    rc = main(["sweep", *map(str, args)])
    return rc, capsys.readouterr().err


def test_cli_sweep_user_errors(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    proc = run_steel("sweep", tmp_path, check=False)  # one real process: exit status and a one-line message
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"steel sweep: error: {tmp_path}: no OOF store (expected {tmp_path}/oof/meta.json; run `steel oof` first)"
    ]
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("space:\n  label: {low: 0.3, high: 0.9, stp: 0.1}\n")
    cases = [
        ((tmp_path / "nope",), "run directory not found"),
        ((run_dir, "--storage", "sweep.db"), "is not a storage URL"),
        ((run_dir, "--storage", "postgresql+psycopg://u:pw@127.0.0.1:1/x"), "cannot open"),
        ((run_dir, "--config", tmp_path / "missing.yaml"), "sweep config not found"),
        ((run_dir, "--workers", "0"), "--workers 0"),
        ((run_dir, "--config", bad_cfg), "label must be a mapping with exactly low, high, step"),
    ]
    for args, msg in cases:
        rc, err = steel_in_process(capsys, *args)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("steel sweep: error:"), err
        assert msg in lines[0] and "pw@" not in lines[0]
    # a study made with another search space is refused rather than mixed
    assert steel_main("sweep", run_dir, "--trials", 2, "--study-name", "s") == 0
    rc, err = steel_in_process(
        capsys, run_dir, "--trials", 1, "--study-name", "s", "--config", bad_cfg.with_name("o.yaml")
    )
    assert rc == 2 and "sweep config not found" in err
    bad_cfg.with_name("o.yaml").write_text("mode: soft\n")
    rc, err = steel_in_process(
        capsys, run_dir, "--trials", 1, "--study-name", "s", "--config", bad_cfg.with_name("o.yaml")
    )
    assert rc == 2 and "another search space" in err


def fast_dice(oof_root, cfg) -> FastDice:
    store = OOFStore(oof_root)
    stats, _ = load_or_compute_stats(store, *sweep_grids(cfg), cfg["mode"], progress=False)
    return FastDice(stats, np.asarray(store.cls), store.folds)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_batch_written_trials_are_optuna_trials(oof_root, tmp_path, kind):
    """TrialWriter (SQLite: one transaction per batch, straight into optuna's tables) stores what optuna's
    own trials hold; numbering continues optuna's, optuna keeps working on the study, the search reads it."""
    cfg = load_config(None)
    objective = sweep.Objective(fast_dice(oof_root, cfg), cfg)
    url = f"sqlite:///{tmp_path / 's.db'}" if kind == "sqlite" else f"journal://{tmp_path / 's.log'}"
    storage = sweep.open_storage(url)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.optimize(objective, n_trials=3)  # trials made by optuna itself (as by an older steel sweep)
    rng = np.random.default_rng(1)
    values = [vars_of(random_params(cfg, rng)) for _ in range(7)]
    made = [
        optuna.trial.create_trial(params=v, distributions=objective.dists, value=objective.evaluate(v)[0])
        for v in values
    ]
    writer = sweep.TrialWriter(storage, "s")
    assert writer.bulk == (kind == "sqlite")
    assert writer.write(made[:5]) == [3, 4, 5, 6, 7] and writer.write(made[5:]) == [8, 9]
    again = optuna.load_study(study_name="s", storage=sweep.open_storage(url))  # another process, say
    again.optimize(objective, n_trials=1)
    back = optuna.load_study(study_name="s", storage=sweep.open_storage(url)).get_trials(deepcopy=False)
    assert [t.number for t in back] == list(range(11))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in back)
    for a, b in zip(made, back[3:10]):
        assert (b.params, b.distributions, b.value) == (a.params, a.distributions, a.value)
        assert (b.datetime_start, b.datetime_complete) == (a.datetime_start, a.datetime_complete)
    assert back[0].distributions == back[5].distributions  # the same distributions as optuna's suggest_*
    search = sweep.TrialSearch(objective, cfg, seed=0)
    search.sync(again)
    assert search.finished == {t.number: t.value for t in back}
    # mean objective: each class's TPE learns from that class's own mean dice
    assert len(search.groups) == 4 and np.allclose(
        search.groups[2].y, [objective.evaluate(t.params)[1][2] for t in back]
    )


@pytest.mark.parametrize("objective_kind", ["mean", "robust"])
def test_batched_tpe_beats_random_search(oof_root, objective_kind):
    cfg = load_config(None)
    cfg["objective"] = objective_kind
    cfg["sampler"].update(n_startup_trials=20, batch=8)
    fast = fast_dice(oof_root, cfg)
    objective = sweep.Objective(fast, cfg)
    study, interrupted, finished = sweep.run_study(
        fast, cfg, "memory", optuna.storages.InMemoryStorage(), "s", 150, progress=False
    )
    assert not interrupted and len(finished) == 150 == len(study.trials)
    assert study.trials[0].params == vars_of(Params.uniform())  # the default thresholds come first
    rng = np.random.default_rng(0)
    random_best = max(objective.evaluate(vars_of(random_params(cfg, rng)))[0] for _ in range(150))
    assert study.best_value > random_best
    assert study.best_value == max(finished.values())
