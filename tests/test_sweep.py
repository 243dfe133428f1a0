"""`steel sweep`: the exact search and TPE through Optuna's public API, its study read by Optuna's own command
line, storages, user errors, concurrent runs, kills, and thresholds.json never replaced by a worse result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from steel.errors import SteelError
from steel.oof import OOFStore
from steel.postprocess import Params
from steel.sweep_config import DEFAULT_CONFIG, Dim, load_config, sweep_grids
from steel.sweep_solver import brute_force_dice
from steel.synth import write_synthetic_oof
from tests.conftest import HANG_GUARD_S, run_steel, steel_in_process

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


@pytest.fixture(autouse=True)
def no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def thresholds(run_dir: Path) -> dict:
    return json.loads((run_dir / "thresholds.json").read_text())


def load_study(out: dict) -> optuna.Study:
    return optuna.load_study(study_name=out["study_name"], storage=out["storage"])


def test_configs(tmp_path):
    assert yaml.safe_load((ROOT / "sweeps" / "default.yaml").read_text()) == DEFAULT_CONFIG
    wide = load_config(ROOT / "sweeps" / "wide.yaml")
    assert len(sweep_grids(wide)[0]) > len(sweep_grids(load_config(None))[0])
    ok = tmp_path / "ok.yaml"
    ok.write_text("search: tpe\nobjective: robust\nclasses:\n  4: {min_area: {high: 6000, step: 200}}\n")
    cfg = load_config(ok)  # a partial override inherits the rest of the dimension
    assert cfg["dims"][3]["min_area"] == Dim(0, 6000, 200, True) and cfg["dims"][0]["min_area"].high == 3000
    assert cfg["objective"] == "robust" and cfg["search"] == "tpe"

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
    bad("space:\n  scale: {low: 0, high: 2, step: 0.5}\n", r"scale range \[0, 2\] must lie in \[0, 2\)")
    bad("mode: gentle\n", "mode 'gentle' is not one of hard, soft, scaled")
    bad("classes:\n  5: {}\n", "classes key '5'")
    bad("objective: median\n", "objective 'median'")
    bad("search: grid\n", "search 'grid'")
    bad("top_k: 0\n", "top_k 0 must be an integer >= 1")
    bad("sampler: {multivariate: 1}\n", "sampler multivariate 1 must be true or false")
    bad("sampler: {batch: 16}\n", "unknown sampler key 'batch'")
    bad("[1, 2\n", "not valid YAML")
    with pytest.raises(SteelError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_exact_sweep_writes_thresholds_study_and_png(run_dir):
    proc = run_steel("sweep", run_dir)  # a real process: the default search is the exact one
    assert "OOF dice" in proc.stdout and "class 4" in proc.stdout
    out = thresholds(run_dir)
    assert out["search"] == "exact" and out["stride"] == 2 and out["mode"] == "hard"
    assert out["oof_store"]["full_res_areas"] is False  # drawn at the stride: no full-resolution histograms
    assert out["default_params"] == Params.uniform().to_dict()
    store = OOFStore(run_dir)
    best = Params.load(run_dir)
    bf = brute_force_dice(store, best)
    assert (
        abs(out["oof_dice"]["mean"] - bf.mean()) <= 1e-9
        and abs(out["oof_dice"]["objective"] - bf.mean()) <= 1e-9
    )
    assert np.allclose(out["oof_dice"]["per_class"], bf.mean(0), atol=1e-9)
    assert abs(out["default_dice"]["mean"] - brute_force_dice(store, Params.uniform()).mean()) <= 1e-9
    assert out["oof_dice"]["mean"] > out["default_dice"]["mean"]
    assert (run_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the study: default, best, each class's runners-up, public-API trials with per-class dice
    study = load_study(out)
    trials = study.get_trials(deepcopy=False)
    assert out["trials"] == len(trials) == 2 + 4 * (DEFAULT_CONFIG["top_k"] - 1)
    kinds = {t.user_attrs["kind"]: t for t in trials}
    assert kinds["exact best"].number == out["best_trial"] == study.best_trial.number
    assert abs(kinds["default"].value - out["default_dice"]["mean"]) <= 1e-12
    assert np.allclose(kinds["exact best"].user_attrs["dice"], bf.mean(0), atol=1e-9)
    assert all(t.value <= study.best_value for t in trials)
    assert study.user_attrs["oof"] == out["oof_store"]["fingerprint"] and study.user_attrs["stride"] == 2
    # a re-run finds the same best: nothing added, the same thresholds
    assert steel_in_process("sweep", run_dir).returncode == 0
    again = thresholds(run_dir)
    assert (
        again["trials"] == out["trials"] and again["trials_added"] == 0 and again["classes"] == out["classes"]
    )


def test_optuna_command_line_reads_the_study(run_dir):
    steel_in_process("sweep", run_dir)
    out = thresholds(run_dir)
    optuna_cli = [str(Path(sys.executable).with_name("optuna"))]  # the console script optuna installs
    if not Path(optuna_cli[0]).is_file():
        pytest.skip(f"no optuna command beside {sys.executable}")
    studies = subprocess.run([*optuna_cli, "studies", "--storage", out["storage"], "-f", "json"],
                             capture_output=True, text=True, timeout=HANG_GUARD_S, check=True)  # fmt: skip
    listed = {s["name"]: s for s in json.loads(studies.stdout)}
    assert listed[out["study_name"]]["n_trials"] == out["trials"]
    best = subprocess.run([*optuna_cli, "best-trial", "--study-name", out["study_name"], "--storage", out["storage"],
                           "-f", "json"], capture_output=True, text=True, timeout=HANG_GUARD_S, check=True)  # fmt: skip
    trial = json.loads(best.stdout)
    assert trial["number"] == out["best_trial"]
    assert abs(trial["value"] - out["oof_dice"]["objective"]) <= 1e-12
    assert trial["params"] == {f"{k}_{c}": v for c, p in out["classes"].items() for k, v in p.items()}


def test_tpe_search_in_a_journal_file(run_dir, tmp_path):
    journal = tmp_path / "sweep.log"
    proc = steel_in_process(
        "sweep", run_dir, "--trials", 12, "--seed", 3, "--storage", f"journal://{journal}"
    )
    assert proc.returncode == 0
    out = thresholds(run_dir)
    assert out["search"] == "tpe" and out["trials"] == out["trials_added"] == 12 and out["sampler_seed"] == 3
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name=out["study_name"], storage=storage)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 12 and set(trials[5].params) == {
        f"{k}_{c}" for c in range(1, 5) for k in ("pixel", "min_component")
    }
    assert {f"label_{c}" for c in range(1, 5)} <= set(trials[5].user_attrs)
    pixels = {round(t.params["pixel_1"], 12) for t in trials}
    assert len(pixels) >= 8 and any(round(p * 20) != p * 20 for p in pixels)  # continuous, off the 0.05 grid
    # each trial's label and min-area are exact for its pixel / component values: its value is brute force's
    store = OOFStore(run_dir)
    for t in (trials[0], trials[-1]):
        from steel.sweep_study import params_of_trial

        assert abs(t.value - brute_force_dice(store, params_of_trial(t, "hard")).mean()) <= 1e-9
    exact = steel_in_process("sweep", run_dir, "--storage", f"journal://{tmp_path / 'exact.log'}")
    assert exact.returncode == 0  # TPE started from the grid's exact best, so it is at least as good
    assert study.best_value >= thresholds(run_dir)["oof_dice"]["objective"] - 1e-12


def test_scaled_mode_sweep_exact_and_tpe(tmp_path):
    """``mode: scaled``: the exact search also picks a scale per class (one statistics pass per scale; scale 0 is
    hard mode, so the result is at least the hard sweep's), thresholds.json holds the scales, and its dice is
    steel.postprocess's on the store; TPE suggests the scales among the grid's. The store's segmenter is timid
    where the classifier is sure (``timid``): there, scaling the threshold by the class probability pays."""
    run_dir = tmp_path / "run"
    write_synthetic_oof(run_dir / "oof", 64, height=64, width=320, stride=2, n_folds=3, seed=5, timid=4.0)
    cfg = tmp_path / "scaled.yaml"
    cfg.write_text("mode: scaled\nspace:\n  scale: {low: 0, high: 1.5, step: 0.5}\n")
    assert (
        steel_in_process("sweep", run_dir, "--storage", f"journal://{tmp_path / 'hard.log'}").returncode == 0
    )
    hard = thresholds(run_dir)
    proc = steel_in_process("sweep", run_dir, "--config", cfg, "--storage", f"journal://{tmp_path / 's.log'}")
    assert proc.returncode == 0
    out = thresholds(run_dir)
    best = Params.load(run_dir)
    assert out["mode"] == best.mode == "scaled" and set(out["classes"]["1"]) >= {"scale", "pixel", "label"}
    assert all(p.scale in (0.0, 0.5, 1.0, 1.5) for p in best.classes) and any(
        p.scale > 0 for p in best.classes
    )
    bf = brute_force_dice(OOFStore(run_dir), best)
    assert abs(out["oof_dice"]["mean"] - bf.mean()) <= 1e-9
    assert out["oof_dice"]["mean"] > hard["oof_dice"]["mean"] + 0.005, (out["oof_dice"], hard["oof_dice"])
    assert len(list((run_dir / "oof").glob("stats-*.npz"))) >= 4  # hard + scales 0.5, 1, 1.5
    assert "scale" in proc.stdout
    # TPE in scaled mode: scale_C categorical over the grid; the trial values are brute force's
    tpe = steel_in_process("sweep", run_dir, "--config", cfg, "--trials", 4, "--seed", 1, "--storage",
                           f"journal://{tmp_path / 't.log'}")  # fmt: skip
    assert tpe.returncode == 0
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "t.log"))
    )
    study = optuna.load_study(study_name=thresholds(run_dir)["study_name"], storage=storage)
    from steel.sweep_study import params_of_trial

    for t in study.get_trials(deepcopy=False):
        assert {f"scale_{c}" for c in range(1, 5)} <= set(t.params)
        assert abs(t.value - brute_force_dice(OOFStore(run_dir), params_of_trial(t, "scaled")).mean()) <= 1e-9


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("steel sweep: error:"), (
        proc.stderr
    )
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_user_errors_end_in_one_line(run_dir, tmp_path):
    proc = run_steel("sweep", tmp_path, check=False)  # a real process: exit status and one line
    one_line_error(proc, f"{tmp_path}: no OOF store")
    proc = steel_in_process(
        "sweep", run_dir, "--storage", "sqlite:////nonexistent/steel-dir/x.db", check=False
    )
    one_line_error(
        proc, "sqlite:////nonexistent/steel-dir/x.db", "directory /nonexistent/steel-dir does not exist"
    )
    assert not Path("/nonexistent").exists()
    assert not (run_dir / "thresholds.json").exists()
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("space:\n  label: {low: 0.3, high: 0.9, stp: 0.1}\n")
    cases = [
        ((tmp_path / "nope",), "run directory not found"),
        ((run_dir, "--storage", "sweep.db"), "is not a storage URL"),
        (
            (run_dir, "--storage", f"journal://{tmp_path}/no/such/dir/j.log"),
            f"directory {tmp_path}/no/such/dir does not exist",
        ),
        ((run_dir, "--storage", "postgresql+psycopg://u:pw@127.0.0.1:1/x"), "cannot open"),
        ((run_dir, "--config", tmp_path / "missing.yaml"), "sweep config not found"),
        ((run_dir, "--workers", "0"), "--workers 0"),
        ((run_dir, "--search", "exact", "--trials", "5"), "trials are for --search tpe"),
        ((run_dir, "--trials", "-1"), "--trials -1"),
        ((run_dir, "--config", bad_cfg), "label must be a mapping with exactly low, high, step"),
    ]
    for args, msg in cases:
        line = one_line_error(steel_in_process("sweep", *args, check=False), msg)
        assert "pw@" not in line
    assert not (tmp_path / "no").exists()
    # a study made with another search space is refused rather than mixed
    assert steel_in_process("sweep", run_dir, "--study-name", "s").returncode == 0
    other = tmp_path / "soft.yaml"
    other.write_text("mode: soft\n")
    one_line_error(steel_in_process("sweep", run_dir, "--study-name", "s", "--config", other, check=False),
                   "study 's'", "another search space")  # fmt: skip


def test_worse_rerun_keeps_the_better_thresholds(run_dir, tmp_path):
    assert steel_in_process("sweep", run_dir).returncode == 0
    good = thresholds(run_dir)
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text(
        "space:\n  label: {low: 0.9, high: 0.9, step: 0.1}\n  pixel: {low: 0.7, high: 0.7, step: 0.1}\n"
    )
    proc = steel_in_process("sweep", run_dir, "--config", narrow)
    assert proc.returncode == 0
    kept = [line for line in proc.stdout.splitlines() if line.startswith("kept ")]
    assert (
        len(kept) == 1 and f"{good['oof_dice']['objective']:.5f}" in kept[0] and "beats this run's" in kept[0]
    )
    assert thresholds(run_dir) == good
    # another objective is another measure: the new file replaces it, and says so
    robust = tmp_path / "robust.yaml"
    robust.write_text("objective: robust\n")
    proc = steel_in_process("sweep", run_dir, "--config", robust)
    assert any(line.startswith("replaced ") for line in proc.stdout.splitlines())
    assert thresholds(run_dir)["objective"] == "robust"


def test_concurrent_sweeps_on_one_study_draw_different_proposals(run_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    common = ["sweep", run_dir, "--storage", url, "--study-name", "shared", "--seed", "7"]
    assert (
        steel_in_process(*common, "--trials", 2).returncode == 0
    )  # the study exists (enqueued trials in it)
    procs = [subprocess.Popen([sys.executable, "-m", "steel.cli", *map(str, common), "--trials", "10"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=HANG_GUARD_S)
        assert p.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=url)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 22 and sorted(t.number for t in trials) == list(range(22))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    new = [tuple(sorted(t.params.items())) for t in trials[2:]]
    assert len(set(new)) == 20  # same --seed, yet no proposal drawn twice: trials are seeded by their number
    assert thresholds(run_dir)["trials"] == 22  # the last writer counted every finished trial


def descendants(pid: int) -> set[int]:
    """Every process below pid (from /proc/PID/task/*/children)."""
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for f in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                kids = [int(x) for x in f.read_text().split()]
            except OSError:
                continue
            out.update(kids)
            todo.extend(kids)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_killed_sweep_leaves_no_process_behind(run_dir, tmp_path, sig):
    """`--workers 2` while the statistics are computed, then a long TPE search: the parent is killed."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "steel.cli", "sweep", str(run_dir), "--workers", "2", "--trials", "100000",
           "--storage", f"sqlite:///{tmp_path / 'k.db'}", "--study-name", "k"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen: set[int] = set()
    deadline = time.monotonic() + HANG_GUARD_S
    url = f"sqlite:///{tmp_path / 'k.db'}"
    while time.monotonic() < deadline and proc.poll() is None:  # until some trials are in
        seen |= descendants(proc.pid)
        try:
            if len(optuna.load_study(study_name="k", storage=url).get_trials(deepcopy=False)) >= 3:
                break
        except Exception:  # no study (or no database) yet
            pass
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1]
    seen |= descendants(proc.pid)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    time.sleep(0.5)
    assert not [p for p in seen if alive(p)], f"left behind: {seen}"
    assert seen == set()  # the statistics run in threads: no child process at all
    if sig == signal.SIGINT:  # Ctrl-C: the finished trials are summarised, exit status 130
        assert proc.returncode == 130, err
        out = thresholds(run_dir)
        assert out["trials"] == len(optuna.load_study(study_name="k", storage=url).get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))  # fmt: skip
    else:
        assert proc.returncode == -sig
