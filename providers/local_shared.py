"""One local model server per user and model file, shared by every run on the machine.

The first run that needs the local model starts a detached supervisor process
(`local_supervisor.py`) that serves llama.cpp on a loopback port; later runs find it
through a state file and reuse it, so concurrent sessions queue on one model (llama.cpp's
own request queue, one slot) instead of each loading a copy and fighting for the cores.
Files, in `<cache dir>/servers/` (per user: the user cache dir, or LOOPSTREAM_CACHE_DIR):

- `<key>.lock` — flock'd (exclusively, briefly) by whoever reads or changes the state;
- `<key>.json` — the state: supervisor pid and start time, port, API token, model path, lease file;
- `<key>.<pid>.<random>.lease` — every client holds a shared flock on it while it uses the server (the
  kernel drops it when the client exits, even by a crash); the supervisor stops once nobody has
  held it for the idle time (LOOPSTREAM_LOCAL_IDLE_SECONDS, default 300);
- `<key>.log` — the supervisor's output.

`<key>` is derived from the model file. A state file is never trusted as written: its pid
must be alive with the start time recorded, and the server on its port must accept the
state's token and refuse any other (llama.cpp's API key), so a dead supervisor, a reused pid
or a reused port reads as stale and a new server starts. LOOPSTREAM_LOCAL_SHARED=0 opts out:
the run starts its own in-process server (LocalServer), as before.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from loopstream.core.sampling import Sampling

from .base import Message, ModelReply, ProviderError, ToolSpec
from .errors import LocalModelError, ProviderConfigError
from .local import DEFAULT_MODEL, LocalModel, default_cache_dir, ensure_local_model
from .openai_compat import OpenAICompatProvider

try:
    import fcntl
except ImportError:  # Windows: no flock; every run starts its own server
    fcntl = None  # type: ignore[assignment]

STATE_VERSION = 1
DEFAULT_IDLE_SECONDS = 300.0
TOKEN_ENV = "LOOPSTREAM_LOCAL_TOKEN"  # how the supervisor gets its token (not argv: `ps` shows that)
SUPERVISOR_MODULE = "loopstream.providers.local_supervisor"


def shared_enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether runs share one local server (the default, where flock exists)."""
    env = os.environ if env is None else env
    return fcntl is not None and env.get("LOOPSTREAM_LOCAL_SHARED", "1").strip().lower() not in ("0", "false", "no", "off")


def idle_seconds(env: Mapping[str, str] | None = None) -> float:
    """How long the shared server stays up with no client (LOOPSTREAM_LOCAL_IDLE_SECONDS)."""
    env = os.environ if env is None else env
    raw = env.get("LOOPSTREAM_LOCAL_IDLE_SECONDS", "").strip()
    try:
        value = float(raw) if raw else DEFAULT_IDLE_SECONDS
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ProviderConfigError(f"LOOPSTREAM_LOCAL_IDLE_SECONDS must be a number of seconds above 0, not {raw!r}")
    return value


def state_dir() -> Path:
    return default_cache_dir() / "servers"


def server_key(model: Path) -> str:
    """Names one server per model file (its real path, size and modification time)."""
    st = model.stat()
    return hashlib.sha256(f"{model.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), None where unknown:
    with the pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the name before ")" may hold spaces


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's: not ours
        return False
    return True


@dataclass(frozen=True)
class ServerState:
    """What `<key>.json` says about the running server (to be checked before use)."""

    pid: int
    started: str | None
    port: int
    token: str
    model: str
    lease: str  # file name of the lease, next to the state file
    v: int = STATE_VERSION

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @classmethod
    def read(cls, path: Path) -> ServerState | None:
        """The state in `path`, or None when missing, unreadable or of another format."""
        try:
            raw = json.loads(path.read_text())
            state = cls(**raw)
        except (OSError, ValueError, TypeError):
            return None
        ok = (state.v == STATE_VERSION and isinstance(state.pid, int) and isinstance(state.port, int)
              and 0 < state.port < 65536 and isinstance(state.token, str) and isinstance(state.lease, str)
              and "/" not in state.lease)
        return state if ok else None

    def write(self, path: Path) -> None:
        """Atomically (temp file + rename), readable by this user only: it holds the token."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(asdict(self), out)
        os.replace(tmp, path)


def is_ours(state: ServerState, model: Path, timeout: float = 30.0) -> bool:
    """The supervisor the state names is alive (same pid, same start time), serves `model`,
    and its server accepts the state's token and refuses another: nothing else passes."""
    if state.model != str(model) or not pid_alive(state.pid):
        return False
    if state.started is not None and process_start(state.pid) != state.started:
        return False  # the pid was reused by another process
    url = f"{state.base_url}/models"
    try:
        mine = httpx.get(url, headers={"Authorization": f"Bearer {state.token}"}, timeout=timeout)
        other = httpx.get(url, headers={"Authorization": f"Bearer {secrets.token_hex(16)}"}, timeout=timeout)
    except httpx.HTTPError:
        return False
    return mine.status_code == 200 and model.stem in mine.text and other.status_code == 401


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created if needed) for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def spawn_supervisor(model: Path, key: str, directory: Path, idle: float, timeout: float = 300.0) -> ServerState:
    """Start a detached supervisor for `model` and wait until its state file names it.
    Call with the state lock held: nobody else reads the state meanwhile."""
    token = secrets.token_urlsafe(24)
    cmd = [sys.executable, "-m", SUPERVISOR_MODULE, "--model", str(model), "--key", key,
           "--dir", str(directory), "--idle", str(idle)]
    env = {**os.environ, TOKEN_ENV: token}
    # The launcher forks the supervisor, prints its pid and exits: the supervisor is nobody's
    # child (no zombie) and lives on in its own session after this run ends.
    try:
        launched = subprocess.run(cmd, env=env, cwd=directory, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=60, start_new_session=True)
        pid = int(launched.stdout.strip())
    except (subprocess.SubprocessError, ValueError, OSError) as exc:
        raise LocalModelError(f"could not start the shared local model server: {exc}") from None
    path = directory / f"{key}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = ServerState.read(path)
        if state is not None and state.token == token and state.pid == pid:
            return state
        if not pid_alive(pid):
            raise LocalModelError(f"the shared local model server exited while starting: {_log_tail(directory, key)}")
        time.sleep(0.1)
    os.kill(pid, 15)  # ours, and stuck: the state never named it, so no one else uses it
    raise LocalModelError(f"the shared local model server did not start within {timeout:.0f}s")


def _log_tail(directory: Path, key: str) -> str:
    try:
        lines = (directory / f"{key}.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1][:300] if lines else "(empty log)"


def _drop_dead_leases(directory: Path, key: str) -> None:
    """Lease files of supervisors that died without cleaning up (killed): nobody serves them."""
    for lease in directory.glob(f"{key}.*.lease"):
        pid = lease.name.split(".")[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            lease.unlink(missing_ok=True)


class SharedLocalServer:
    """A lease on the machine's shared local model server, started if none is running.

    A context manager like LocalServer: `base_url` and `api_key` are valid while it is held."""

    def __init__(self, model_path: Path | str | None = None, *, idle: float | None = None,
                 directory: Path | None = None, model: LocalModel = DEFAULT_MODEL) -> None:
        self.model_path = Path(model_path) if model_path else None
        self.model = model
        self.idle = idle if idle is not None else idle_seconds()
        self.directory = directory
        self.state: ServerState | None = None
        self._lease_fd: int | None = None

    @property
    def base_url(self) -> str | None:
        return self.state.base_url if self.state else None

    @property
    def api_key(self) -> str | None:
        return self.state.token if self.state else None

    @property
    def served_name(self) -> str:
        """The model name the server answers to: the GGUF's file name without `.gguf`."""
        return self.model_path.stem if self.model_path else self.model.name

    def start(self) -> Self:
        if self._lease_fd is not None:
            return self
        model = self.model_path or ensure_local_model(model=self.model)
        directory = self.directory or state_dir()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = server_key(model)
        path = directory / f"{key}.json"
        with locked(directory / f"{key}.lock"):
            state = ServerState.read(path)
            if state is None or not is_ours(state, model):
                path.unlink(missing_ok=True)  # stale: never trusted again (the process is left alone)
                _drop_dead_leases(directory, key)
                state = spawn_supervisor(model, key, directory, self.idle)
            # Taken under the state lock: the supervisor decides to stop under it too, so it
            # never stops between our check and our lease.
            fd = os.open(directory / state.lease, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)
        self.state, self._lease_fd = state, fd
        return self

    def stop(self) -> None:
        """Give up the lease (the server stays for the next run until it is idle)."""
        fd, self._lease_fd = self._lease_fd, None
        if fd is not None:
            os.close(fd)

    def recover(self) -> None:
        """After a connection failure: take a lease on whichever server is (or now starts) up."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class SharedLocalProvider(OpenAICompatProvider):
    """The local model through the shared server: follows it to a new port if it had to restart."""

    def __init__(self, server: SharedLocalServer, *, action_mode: str = "json_schema", timeout: float = 600.0) -> None:
        super().__init__("http://127.0.0.1:0/v1", None, server.served_name, action_mode, timeout, name="local")  # type: ignore[arg-type]
        self.server = server

    def _follow(self) -> None:
        if self.server.base_url and self.server.base_url != self.base_url:
            self.retarget(self.server.base_url, self.server.api_key)

    def complete(self, messages: list[Message], tools: list[ToolSpec], sampling: Sampling | None = None, *,
                 timeout: float | None = None) -> ModelReply:
        self._follow()
        try:
            return super().complete(messages, tools, sampling, timeout=timeout)
        except ProviderError as exc:
            if exc.kind == "connection":  # the server is gone: the retry goes to a live one
                try:
                    self.server.recover()
                except ProviderConfigError:
                    pass  # no new server either: the retry fails the same way, and says so
            raise

    def count_tokens(self, messages: list[Message]) -> int:
        self._follow()
        return super().count_tokens(messages)


def running_servers(directory: Path | None = None) -> list[dict[str, Any]]:
    """The shared servers whose state files pass the liveness checks (for tests and benchmarks)."""
    directory = directory or state_dir()
    out = []
    for path in sorted(directory.glob("*.json")):
        state = ServerState.read(path)
        if state is not None and pid_alive(state.pid):
            out.append(asdict(state))
    return out
