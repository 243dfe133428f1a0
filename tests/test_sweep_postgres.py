"""`steel sweep` with 2 workers sharing one study in PostgreSQL: no trial may be lost.

Uses STEEL_TEST_POSTGRES_URL (set by `eval "$(bash .ci/postgres.sh)"`, as .ci/run does); without it, starts a
throwaway cluster itself with .ci/postgres.sh (never installing packages), or skips saying why.
"""

import os
import subprocess
import uuid
from pathlib import Path

import optuna
import pytest

from steel.sweep import write_synthetic_oof
from tests.conftest import run_steel

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
    env = {
        **os.environ,
        "STEEL_PG_NO_INSTALL": "1",
        "STEEL_PG_PORT": "54339",
    }  # the cluster dir: a new /tmp dir
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


def test_two_workers_share_a_postgres_study(postgres_url, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    write_synthetic_oof(tmp_path / "run" / "oof", 40, height=64, width=320, stride=2, n_folds=2, seed=9)
    name = f"pg-{uuid.uuid4().hex[:12]}"
    proc = run_steel(
        "sweep",
        tmp_path / "run",
        "--storage",
        postgres_url,
        "--study-name",
        name,
        "--trials",
        12,
        "--workers",
        2,
    )
    assert "warning" not in proc.stderr  # the batched insert worked (no fall-back to one trial at a time)
    from steel.cli import main  # a second invocation adds to the same study

    assert (
        main(
            ["sweep", str(tmp_path / "run"), "--storage", postgres_url, "--study-name", name, "--trials", "3"]
        )
        == 0
    )
    asked = 12 + 3
    study = optuna.load_study(study_name=name, storage=postgres_url)
    states = [t.state for t in study.trials]
    assert len(states) == asked and all(s == optuna.trial.TrialState.COMPLETE for s in states)
    assert len({t.number for t in study.trials}) == asked
    assert (tmp_path / "run" / "thresholds.json").is_file()
    optuna.delete_study(study_name=name, storage=postgres_url)
