"""No process outlives its command: kill a parent (SIGINT, SIGTERM, SIGKILL) and check its children end too.

``kill_parent_and_check`` is generic: it starts any command, waits until the process tree has the expected
children (read from /proc), sends one signal to the parent only, and waits for every child to be gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SYNTH_SHAPE, make_synth, steel_in_process

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc"
)

REPO = Path(__file__).resolve().parents[1]


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of a process from /proc, None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), fields[0], int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of every living descendant of ``pid``."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None and st[1] != "Z":
            table[int(entry)] = st
    found: dict[int, int] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _, start) in table.items():
            if ppid == parent and child not in found:
                found[child] = start
                frontier.append(child)
    return found


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[2] == start and st[1] not in ("Z", "X")  # same process, not a zombie


def kill_parent_and_check(
    cmd: list[str],
    sig: signal.Signals,
    n_children: int,
    *,
    cwd: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    start_timeout: float = 300.0,
    exit_timeout: float = 60.0,
) -> dict[int, int]:
    """Run ``cmd``; once it has at least ``n_children`` descendants, send ``sig`` to it alone and assert that
    it and every descendant it had are gone within ``exit_timeout`` s. Returns the descendants that were seen.

    The command runs in its own session, so nothing but the parent receives the signal (as with ``kill PID``).
    """
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    children: dict[int, int] = {}
    try:
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            children = descendants(proc.pid)
            if len(children) >= n_children:
                break
            if proc.poll() is not None:
                pytest.fail(
                    f"{cmd} ended ({proc.returncode}) before it had {n_children} children: {proc.stderr.read()}"
                )
            time.sleep(0.2)
        else:
            pytest.fail(f"{cmd} had {len(children)} children after {start_timeout} s, expected {n_children}")
        time.sleep(
            1.0
        )  # let the children settle into their work (a signal during their start is a different case)
        children.update(descendants(proc.pid))
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=exit_timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"parent {proc.pid} still running {exit_timeout} s after {sig.name}")
        deadline = time.monotonic() + exit_timeout
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in children.items()):
            time.sleep(0.2)
        left = [p for p, s in children.items() if _alive(p, s)]
        assert not left, f"{sig.name} to the parent left children {left} running after {exit_timeout} s"
        return children
    finally:
        for p, s in {**children, **descendants(proc.pid)}.items():  # never leave a process behind
            if _alive(p, s):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_helper_sees_orphans():
    """The helper itself fails when a child survives its parent (a shell whose child ignores the signal)."""
    script = "sleep 600 & sleep 600 & wait"
    with pytest.raises(AssertionError, match="left children"):
        kill_parent_and_check(["sh", "-c", script], signal.SIGKILL, 2, exit_timeout=2.0)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """(data dir, folds csv) of 12 images: enough for a fit that runs until it is killed."""
    data = make_synth(tmp_path_factory.mktemp("lifecycle") / "data", 12, 1, 0, SYNTH_SHAPE)
    folds = data.parent / "folds.csv"
    steel_in_process("folds", data, "--n-folds", 2, "--out", folds)
    return data, folds


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_fit_dataloader_workers_die_with_parent(tiny_data, tmp_path, sig):
    data, folds = tiny_data
    cmd = [sys.executable, "-m", "steel.cli", "fit", "--config", str(REPO / "experiments" / "tiny.yaml")]
    cmd += ["--data.data_dir", str(data), "--data.folds_csv", str(folds), "--data.num_workers", "2"]
    cmd += [
        "--data.persistent_workers",
        "true",
        "--trainer.max_epochs",
        "100000",
        "--trainer.logger",
        "false",
    ]
    cmd += ["--run_dir", str(tmp_path / "run")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "offline"}
    seen = kill_parent_and_check(cmd, sig, 2, cwd=tmp_path, env=env)
    assert len(seen) >= 2


LOADER_SCRIPT = """
import sys, time
import numpy as np
from torch.utils.data import DataLoader, Dataset

class Big(Dataset):  # numpy items travel through the worker's pipe (tensors would go through shared memory)
    def __len__(self):
        return 10**6
    def __getitem__(self, i):
        return np.full(1 << 20, i % 251, np.uint8)

init = None
if sys.argv[1] == "worker_init":
    from steel.lifecycle import WorkerInit
    init = WorkerInit()
loader = DataLoader(Big(), batch_size=1, num_workers=2, worker_init_fn=init, collate_fn=lambda b: b)
it = iter(loader)
next(it)
time.sleep(3600)  # the workers fill the pipe with prefetched items and wait for a reader
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_dataloader_workers_with_full_pipe_die_with_parent(sig):
    """Workers blocked writing a result to a dead parent never check PyTorch's watchdog: WorkerInit must
    end them (without it they live on: see ``test_worker_init_is_what_ends_them``)."""
    kill_parent_and_check([sys.executable, "-c", LOADER_SCRIPT, "worker_init"], sig, 2, cwd=REPO)


def test_worker_init_is_what_ends_them():
    """The same loader without WorkerInit keeps its workers after SIGKILL: the case above tests something."""
    with pytest.raises(AssertionError, match="left children"):
        kill_parent_and_check(
            [sys.executable, "-c", LOADER_SCRIPT, "none"], signal.SIGKILL, 2, cwd=REPO, exit_timeout=15
        )


WRITER_SCRIPT = """
import sys, time
from steel.io import atomic_dir, atomic_path

kind, target = sys.argv[1], sys.argv[2]
with (atomic_path(target, ".csv") if kind == "file" else atomic_dir(target)) as tmp:
    (tmp if kind == "file" else tmp / "a.txt").write_text("partial")
    print(tmp, flush=True)
    time.sleep(3600)
"""


def _writer(kind: str, target: Path) -> tuple[subprocess.Popen, Path]:
    """A process stopped in the middle of an atomic write of ``target``, and its temp path."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, kind, str(target)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.exists() and tmp.parent == target.parent and tmp.name.startswith(f".{target.name}.tmp-")
    return proc, tmp


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_next_write_removes_temp_of_killed_writer(tmp_path, kind):
    from steel.io import atomic_dir, write_text

    target = tmp_path / ("out.csv" if kind == "file" else "outdir")
    dead, dead_tmp = _writer(kind, target)
    dead.kill()
    dead.wait()
    assert dead_tmp.exists()
    live, live_tmp = _writer(kind, target)  # the next write of target, still in progress
    try:
        assert not dead_tmp.exists(), "the killed writer's temp survived the next write"
        if kind == "file":
            write_text(target, "new")
            assert target.read_text() == "new"
        else:
            with atomic_dir(target) as d:
                (d / "b.txt").write_text("new")
            assert [p.name for p in target.iterdir()] == ["b.txt"]
        assert live_tmp.exists(), "a running writer's temp was removed"
        # a dead writer's temp of another path stays until that path is written
        other = tmp_path / f".other.csv{dead_tmp.name[len(target.name) + 1 :]}"
        other.mkdir() if kind == "dir" else other.write_text("x")
        write_text(tmp_path / "other2.csv", "y")
        assert other.exists()
        write_text(tmp_path / "other.csv", "y")
        assert not other.exists()
    finally:
        live.kill()
        live.wait()
