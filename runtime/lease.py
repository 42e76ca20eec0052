"""Leases: which live process drives a session of a SQLite log (see docs/architecture.md#leases).

A process that drives a session in the foreground (`loopstream run`, `resume`) holds an
advisory lock (`flock`) on `<log>.leases/<session>.lock` for as long as it drives it; a
worker serving the log holds one on `<log>.leases/worker-<pid>.lock`. The operating
system drops the lock when the process ends in any way (exit, crash, SIGKILL), so a
session that has not ended while no process holds its lease, and no worker serves the
log, was interrupted: `loopstream sessions` shows it so, and `resume` continues it.

A lease is only a marker for people and for `resume` (which refuses to drive a session
another process drives): correctness never depends on it, since every append is checked
against the log's next seq.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_SAFE = re.compile(r"[A-Za-z0-9_.-]{1,80}")


class LeaseHeld(RuntimeError):
    """Another live process holds the lease."""

    def __init__(self, session_id: str, pid: int | None) -> None:
        by = f"process {pid}" if pid else "another process"
        super().__init__(f"session {session_id} is being driven by {by}; stop it first or wait for it")
        self.session_id, self.pid = session_id, pid


def lease_dir(log_path: str | Path) -> Path:
    path = Path(log_path)
    return path.with_name(path.name + ".leases")


def lease_path(log_path: str | Path, session_id: str) -> Path:
    name = session_id if _SAFE.fullmatch(session_id) and not session_id.startswith("worker-") \
        else "h-" + hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return lease_dir(log_path) / f"{name}.lock"


@contextmanager
def hold(log_path: str | Path, session_id: str) -> Iterator[None]:
    """Hold the lease on `session_id` while the block runs; LeaseHeld if a live process has it."""
    with _locked(lease_path(log_path, session_id), session_id):
        yield


@contextmanager
def hold_worker(log_path: str | Path) -> Iterator[None]:
    """Mark the log as served by this worker process while the block runs."""
    path = lease_dir(log_path) / f"worker-{os.getpid()}.lock"
    with _locked(path, path.stem):
        yield


def holder(log_path: str | Path, session_id: str) -> int | None:
    """The pid of the live process driving `session_id` (0 if unknown), or None if none does."""
    return _holder(lease_path(log_path, session_id))


def workers_attached(log_path: str | Path) -> bool:
    """True while a live worker process serves this log."""
    try:
        candidates = list(lease_dir(log_path).glob("worker-*.lock"))
    except OSError:
        return False
    return any(_holder(p) is not None for p in candidates)


@contextmanager
def _locked(path: Path, what: str) -> Iterator[None]:
    try:
        path.parent.mkdir(exist_ok=True)
    except OSError:
        yield  # no lease where leases cannot be written (the log then cannot be written either)
        return
    busy = 0
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            busy += 1
            if busy >= 3:  # not just a reader looking (`holder` locks it for an instant)
                raise LeaseHeld(what, _holder(path)) from None
            time.sleep(0.05)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder released and removed it between our open and our lock: again
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        try:
            os.unlink(path)  # while still locked, so no one locks a file that is gone
        except OSError:
            pass
        os.close(fd)


def _holder(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            text = os.read(fd, 32).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
