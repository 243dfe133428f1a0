"""`steel sweep` processes sharing one study in PostgreSQL: no trial lost, no proposal drawn twice.

Uses STEEL_TEST_POSTGRES_URL (set by `eval "$(bash .ci/postgres.sh)"`, as .ci/run does); without it, starts a
throwaway cluster itself with .ci/postgres.sh (never installing packages), or skips saying why.
"""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest

from steel.synth import write_synthetic_oof
from tests.conftest import HANG_GUARD_S, steel_in_process

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "postgres.sh"


@pytest.fixture(scope="module")
def postgres_url():
    url = os.environ.get("STEEL_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    if not SCRIPT.is_file():
        pytest.skip("no STEEL_TEST_POSTGRES_URL and no .ci/postgres.sh to start a server")
    env = {**os.environ, "STEEL_PG_NO_INSTALL": "1", "STEEL_PG_PORT": "54339"}  # the cluster: a new /tmp dir
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in proc.stdout.splitlines()
        if line.startswith("export ")
    )
    if proc.returncode != 0 or "STEEL_TEST_POSTGRES_URL" not in exports:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"no STEEL_TEST_POSTGRES_URL and could not start PostgreSQL with .ci/postgres.sh: {tail}")
    yield exports["STEEL_TEST_POSTGRES_URL"]
    if "STEEL_TEST_POSTGRES_DIR" in exports:  # we started it: stop it
        subprocess.run(
            ["bash", str(SCRIPT), "stop", exports["STEEL_TEST_POSTGRES_DIR"]],
            capture_output=True,
            timeout=120,
        )


def test_processes_share_a_postgres_study(postgres_url, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = tmp_path / "run"
    write_synthetic_oof(run / "oof", 40, height=64, width=320, stride=2, n_folds=2, seed=9)
    name = f"pg-{uuid.uuid4().hex[:12]}"
    common = [
        "sweep",
        str(run),
        "--storage",
        postgres_url,
        "--study-name",
        name,
        "--seed",
        "11",
        "--workers",
        "2",
    ]
    assert steel_in_process(*common, "--trials", "2").returncode == 0  # makes the study (start points in it)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    procs = [subprocess.Popen([sys.executable, "-m", "steel.cli", *common, "--trials", "8"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=HANG_GUARD_S)
        assert p.returncode == 0, err
    study = optuna.load_study(study_name=name, storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 2 + 8 + 8 and sorted(t.number for t in trials) == list(range(18))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    drawn = [tuple(sorted(t.params.items())) for t in trials[2:]]
    assert len(set(drawn)) == 16  # the same --seed in both processes, yet no proposal drawn twice
    out = json.loads((run / "thresholds.json").read_text())
    assert out["study_name"] == name and out["trials"] == 18
    assert abs(out["oof_dice"]["objective"] - study.best_value) <= 1e-12
    # the exact search records its trials in PostgreSQL too
    assert (
        steel_in_process(
            "sweep", str(run), "--storage", postgres_url, "--study-name", name + "-exact"
        ).returncode
        == 0
    )
    assert json.loads((run / "thresholds.json").read_text())["trials"] >= 2
    for n in (name, name + "-exact"):
        optuna.delete_study(study_name=n, storage=postgres_url)
