"""`steel synth`: the Kaggle layout, deterministic by seed, and a data set that is either old or new, never mixed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from steel.errors import SteelError
from steel.labels import read_train
from steel.synth import LAYOUT, synth

REPO = Path(__file__).resolve().parents[1]


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_layout_and_labels(tmp_path):
    out = synth(tmp_path / "d", n_train=6, n_test=2, seed=1, height=32, width=96)
    assert sorted(p.name for p in out.iterdir()) == sorted(LAYOUT)
    table = read_train(out)
    assert len(table) == 6 and table.attrs["shape"] == (32, 96)
    sample = pd.read_csv(out / "sample_submission.csv")
    assert len(sample) == 2 * 4 and set(sample["ClassId"]) == {1, 2, 3, 4}


def test_same_seed_same_bytes(tmp_path):
    a = synth(tmp_path / "a", n_train=4, n_test=1, seed=7, height=32, width=64)
    b = synth(tmp_path / "b", n_train=4, n_test=1, seed=7, height=32, width=64)
    c = synth(tmp_path / "c", n_train=4, n_test=1, seed=8, height=32, width=64)
    assert _tree(a) == _tree(b) and _tree(a) != _tree(c)


def test_refuses_a_file_and_a_dir_with_data(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SteelError, match="is a file"):
        synth(tmp_path / "f", n_train=1, n_test=0)
    d = synth(tmp_path / "d", n_train=4, n_test=1, seed=1, height=32, width=64)
    before = _tree(d)
    with pytest.raises(SteelError, match="holds data already.*--overwrite"):
        synth(d, n_train=2, n_test=1, seed=2, height=32, width=64)
    assert _tree(d) == before
    (tmp_path / "empty").mkdir()
    synth(tmp_path / "empty", n_train=1, n_test=0, height=32, width=64)  # an empty dir is fine


def test_overwrite_replaces_everything_and_keeps_foreign_files_safe(tmp_path):
    d = synth(tmp_path / "d", n_train=5, n_test=1, seed=1, height=32, width=64)
    old = set((d / "train_images").iterdir())
    synth(d, n_train=2, n_test=1, seed=2, height=32, width=64, overwrite=True)
    new = set((d / "train_images").iterdir())
    assert len(new) == 2 and not (old & new)
    assert len(read_train(d)) == 2  # train.csv and images agree: no old image silently defect-free
    (d / "mine.txt").write_text("keep")
    with pytest.raises(SteelError, match="mine.txt: not part of"):
        synth(d, n_train=1, n_test=0, overwrite=True)
    assert (d / "mine.txt").read_text() == "keep" and set((d / "train_images").iterdir()) == new


def test_killed_synth_leaves_the_old_data_set_and_no_debris(tmp_path):
    d = synth(tmp_path / "d", n_train=3, n_test=1, seed=1, height=32, width=64)
    before = _tree(d)
    cmd = [sys.executable, "-m", "steel.cli", "synth", str(d), "--overwrite", "--n-train", "100000"]
    cmd += ["--height", "32", "--width", "64"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        temps: list[Path] = []
        while time.monotonic() < deadline and not any(any(t.glob("train_images/*.jpg")) for t in temps):
            temps = [p for p in tmp_path.iterdir() if p.name.startswith(".d.tmp-")]
            assert proc.poll() is None, "synth ended before it was killed"
            time.sleep(0.1)
        assert temps, "no temporary data set dir appeared"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _tree(d) == before  # the old set, whole
    assert any(t.exists() for t in temps)  # the killed writer's debris ...
    synth(d, n_train=2, n_test=1, seed=3, height=32, width=64, overwrite=True)
    assert not any(t.exists() for t in temps)  # ... is removed by the next write of the same dir
    assert len(read_train(d)) == 2
