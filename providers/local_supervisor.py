"""The process of the shared local model server (see local_shared.py).

Started detached by the first run that needs the local model, it serves llama.cpp on a
loopback port (with an API token, so only runs that read its state file can use it) and
exits once no run has held its lease for the idle time, or when its server stops answering.

    python -m loopstream.providers.local_supervisor --model PATH --key KEY --dir DIR --idle SECONDS
(the token comes in the environment, LOOPSTREAM_LOCAL_TOKEN)
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

import httpx

from .errors import LocalModelError
from .local import LocalServer
from .local_shared import TOKEN_ENV, ServerState, fcntl, locked, process_start

HEALTH_EVERY = 10.0  # seconds between checks that the server still answers
HEALTH_FAILURES = 3  # consecutive failed checks before the supervisor gives up
LOG_LIMIT = 1 << 20  # the log starts afresh when it grows past this


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="local_supervisor", description=__doc__)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--idle", type=float, required=True)
    ap.add_argument("--foreground", action="store_true", help="do not fork (for debugging)")
    args = ap.parse_args(argv)
    token = os.environ.pop(TOKEN_ENV, "")
    if not token or fcntl is None:
        print(f"{TOKEN_ENV} is not set or flock is missing", file=sys.stderr)
        return 2
    if not args.foreground:
        child = os.fork()  # no threads yet: llama.cpp is loaded after the fork
        if child:
            print(child, flush=True)  # the launching run waits for the state file to name this pid
            os._exit(0)
        os.setsid()
    _log_to(args.dir / f"{args.key}.log")
    return serve(args.model, args.key, args.dir, args.idle, token)


def serve(model: Path, key: str, directory: Path, idle: float, token: str) -> int:
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stopping.set())
    lease = f"{key}.{os.getpid()}.{secrets.token_hex(4)}.lease"  # never the name of an older server's
    lease_fd = os.open(directory / lease, os.O_RDWR | os.O_CREAT, 0o600)
    state_path, lock_path = directory / f"{key}.json", directory / f"{key}.lock"
    try:
        server = LocalServer(model, api_key=token).start()
    except LocalModelError as exc:
        _say(f"could not start: {exc}")
        return 1
    ServerState(pid=os.getpid(), started=process_start(os.getpid()), port=server.port, token=token,
                model=str(model), lease=lease).write(state_path)
    _say(f"serving {model.name} on port {server.port} (pid {os.getpid()}, stops after {idle:g}s without a client)")
    try:
        why = _until_idle(lease_fd, lock_path, state_path, token, idle, stopping, server.port)
        _say(f"stopping: {why}")
    finally:
        with locked(lock_path):
            current = ServerState.read(state_path)
            if current is not None and current.token == token:
                state_path.unlink(missing_ok=True)
        (directory / lease).unlink(missing_ok=True)
        os.close(lease_fd)
        server.stop()
    return 0


def _until_idle(lease_fd: int, lock_path: Path, state_path: Path, token: str, idle: float,
                stopping: threading.Event, port: int) -> str:
    """Wait until nobody has held the lease for `idle` seconds (checked again under the state
    lock, under which clients take their leases), a signal, or a dead server; say which."""
    tick = max(0.05, min(1.0, idle / 4))
    free_since: float | None = None
    next_health, failures = time.monotonic() + HEALTH_EVERY, 0
    while not stopping.wait(tick):
        now = time.monotonic()
        if _held(lease_fd):
            free_since = None
        elif free_since is None:
            free_since = now
        elif now - free_since >= idle:
            with locked(lock_path):
                if not _held(lease_fd):
                    _forget(state_path, token)  # under the lock: no client can attach from here on
                    return f"no client for {idle:g}s"
            free_since = None
        if now >= next_health:
            failures = 0 if _healthy(port) else failures + 1
            if failures >= HEALTH_FAILURES:
                return f"the server stopped answering on port {port}"
            next_health = now + HEALTH_EVERY
    return "signal"


def _held(lease_fd: int) -> bool:
    """Whether any client holds the lease (a shared flock): our exclusive try fails then."""
    try:
        fcntl.flock(lease_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(lease_fd, fcntl.LOCK_UN)
    return False


def _forget(state_path: Path, token: str) -> None:
    current = ServerState.read(state_path)
    if current is not None and current.token == token:
        state_path.unlink(missing_ok=True)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=10.0).status_code == 200
    except httpx.HTTPError:
        return False


def _log_to(path: Path) -> None:
    try:
        if path.stat().st_size > LOG_LIMIT:
            path.unlink()
    except OSError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)


def _say(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
