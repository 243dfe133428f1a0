"""Atomic, durable writes: write to a temporary file (or directory) beside the target, fsync it, rename it
into place, then fsync the parent directory, so that after a crash the target is either the old or the new
content, never a mix, and a completed write survives a power loss."""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import itertools
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from steel.errors import SteelError


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory's fsync makes the renames inside it durable)."""
    is_dir = Path(path).is_dir()
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the data itself was synced
        if not is_dir:
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under a directory, then the directories themselves (deepest first)."""
    dirs = []
    for root, _, files in os.walk(path):
        dirs.append(root)
        for name in files:
            fsync_path(Path(root) / name)
    for d in reversed(dirs):
        fsync_path(d)


_HOST = socket.gethostname().replace("/", "_")
_SEQ = itertools.count()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and dirs that interrupted writes of ``path`` left beside it: those of this
    host whose process is gone (names ``.{name}.tmp-{host}-{pid}-{n}...``). Returns what was removed."""
    path = Path(path)
    prefix = f".{path.name}.tmp-{_HOST}-"
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return removed


def _temp_beside(path: Path, suffix: str, want_dir: bool) -> Path:
    """A fresh temp name beside ``path`` after removing stale ones; SteelError naming ``path`` when it (or
    its parent) is of the wrong kind."""
    if path.is_dir() and not want_dir:
        raise SteelError(f"{path}: is a directory, expected a file path to write")
    if path.exists() and not path.is_dir() and want_dir:
        raise SteelError(f"{path}: is a file, expected a directory to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise SteelError(f"{path.parent}: is not a directory, cannot write {path.name} in it") from None
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}-{next(_SEQ)}{suffix}")
    if tmp.is_dir():  # left by a dead process that had this pid: stale
        shutil.rmtree(tmp)
    return tmp


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; if the block succeeds it is fsynced and renamed onto ``path``.

    The temp name (``.{name}.tmp-{host}-{pid}-{n}{suffix}``) says which process wrote it: a write of ``path``
    first removes the temp files of earlier writes whose process died (``remove_stale_temps``)."""
    path = Path(path)
    tmp_path = _temp_beside(path, suffix or ".tmp", want_dir=False)
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))  # the usual permissions (umask)
    try:
        yield tmp_path
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the ``with`` block: processes that
    read-then-write the same result take turns."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # no libc or glibc < 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make the complete directory ``src`` (beside ``dst``) become ``dst``: its files are fsynced, then it is
    swapped with the old ``dst`` in one atomic step where the OS allows (else two renames), and the old one
    removed. Readers see the old directory until the new one is in place, never neither."""
    src, dst = Path(src), Path(dst)
    fsync_tree(src)
    if dst.exists() and _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the old directory
    elif dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    fsync_path(dst.parent)
    return dst


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it replaces ``path`` (``replace_dir``) if the block succeeds."""
    path = Path(path)
    tmp = _temp_beside(path, "", want_dir=True)
    tmp.mkdir(0o777)  # the usual permissions (umask); stale temp dirs of dead writers were removed
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
