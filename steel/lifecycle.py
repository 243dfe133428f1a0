"""Child processes end with their parent: DataLoader workers and helper processes get a signal from the
kernel when the process that started them dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``).

PyTorch's own watchdog is not enough: a worker whose result does not fit the pipe to a dead parent blocks
in its queue's feeder thread forever and never looks at the watchdog.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent ends; if the parent (``parent_pid``, the
    pid it had before starting this process) has already ended, exit now. Does nothing off Linux."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:  # died before prctl: no signal will come
        os._exit(1)


class WorkerInit:
    """DataLoader ``worker_init_fn``: the worker dies with the process that built the loader, then is seeded
    as Lightning seeds workers after ``seed_everything(workers=True)`` (Lightning adds its own
    ``pl_worker_init_function`` only to loaders without one). Picklable, so it works with any start method."""

    def __init__(self) -> None:
        self.parent_pid = os.getpid()

    def __call__(self, worker_id: int) -> None:
        die_with_parent(self.parent_pid)
        if int(os.environ.get("PL_SEED_WORKERS", 0)):
            from lightning_fabric.utilities.seed import pl_worker_init_function

            pl_worker_init_function(worker_id)
