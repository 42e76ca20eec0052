"""One local model server per user and model file, shared by concurrent runs (providers/local_shared.py).

Each test has its own cache dir (the verified model linked into it), so its servers are its
own; the real llama.cpp server runs in the detached supervisor, as for a user."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from loopstream.core.sampling import Sampling
from loopstream.providers.base import Message, ProviderError
from loopstream.providers.local import MODEL_FILE, MODEL_NAME
from loopstream.providers.local_shared import (
    ServerState,
    SharedLocalProvider,
    SharedLocalServer,
    is_ours,
    pid_alive,
    process_start,
    server_key,
)
from tests.conftest import supervisors
from tests.test_cli import cli

needs_model = pytest.mark.local


# ---------------------------------------------------------------- helpers


def llama_servers(cache: Path) -> set[int]:
    """The supervisors for `cache` that run a llama.cpp server (they have the model mapped)."""
    return {pid for pid in supervisors(cache) if maps_model(pid)}


def maps_model(pid: int) -> bool:
    """Whether process `pid` has the model file mapped (llama.cpp mmaps the weights it serves)."""
    try:
        return MODEL_FILE in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


class Permissive(ThreadingHTTPServer):
    """Someone else's HTTP server on a reused port: it answers 200 to anything, any token."""

    daemon_threads = True

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = json.dumps({"models": [{"name": MODEL_NAME}], "data": [{"id": MODEL_NAME}]}).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@pytest.fixture
def permissive() -> Iterator[Permissive]:
    server = Permissive()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    path = tmp_path / MODEL_FILE
    path.write_bytes(b"GGUF not really")
    return path


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---------------------------------------------------------------- a state file is never trusted as written


def test_a_dead_pid_is_not_trusted_even_when_its_port_answers(fake_model: Path, permissive: Permissive) -> None:
    state = ServerState(pid=dead_pid(), started=None, port=permissive.port, token="t", model=str(fake_model),
                        lease="k.1.lease")
    assert not is_ours(state, fake_model)


def test_a_live_process_and_a_reused_port_are_not_trusted(fake_model: Path, permissive: Permissive) -> None:
    # The pid is alive (this very process) and the port answers 200 to the right token,
    # but it also takes a wrong one: not the server the token was made for.
    me = os.getpid()
    state = ServerState(pid=me, started=process_start(me), port=permissive.port, token="t", model=str(fake_model),
                        lease="k.1.lease")
    assert not is_ours(state, fake_model)


def test_a_reused_pid_is_seen_by_its_start_time(fake_model: Path, permissive: Permissive) -> None:
    me = os.getpid()
    if process_start(me) is None:
        pytest.skip("no /proc: start times unknown")
    state = ServerState(pid=me, started="1", port=permissive.port, token="t", model=str(fake_model), lease="k.1.lease")
    assert not is_ours(state, fake_model)


@pytest.mark.parametrize("text", ["", "{", "[]", '{"v": 1}', '{"v": 2, "pid": 1, "started": null, "port": 1, '
                                  '"token": "t", "model": "m", "lease": "l"}',
                                  '{"v": 1, "pid": 1, "started": null, "port": 99999, "token": "t", "model": "m", '
                                  '"lease": "l"}',
                                  '{"v": 1, "pid": 1, "started": null, "port": 80, "token": "t", "model": "m", '
                                  '"lease": "../../etc/passwd"}'])
def test_unreadable_or_foreign_state_files_read_as_none(tmp_path: Path, text: str) -> None:
    path = tmp_path / "k.json"
    path.write_text(text)
    assert ServerState.read(path) is None


def test_the_state_file_is_private_and_round_trips(tmp_path: Path) -> None:
    state = ServerState(pid=12, started="34", port=5678, token="secret", model="/m.gguf", lease="k.12.lease")
    state.write(tmp_path / "k.json")
    assert ServerState.read(tmp_path / "k.json") == state
    assert (tmp_path / "k.json").stat().st_mode & 0o077 == 0


def test_the_key_follows_the_model_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    link = tmp_path / "link.gguf"
    link.symlink_to(a)
    assert server_key(a) == server_key(link) != server_key(b)


# ---------------------------------------------------------------- the real server, shared


@pytest.fixture
def cache(local_cache: Path) -> Path:
    return local_cache


def env_for(cache: Path, idle: float = 3.0) -> dict[str, str]:
    return {"LOOPSTREAM_CACHE_DIR": str(cache), "LOOPSTREAM_LOCAL_IDLE_SECONDS": str(idle)}


def the_state(cache: Path) -> ServerState | None:
    states = [ServerState.read(p) for p in (cache / "servers").glob("*.json")]
    assert len(states) <= 1
    return states[0] if states else None


@needs_model
@pytest.mark.slow
def test_two_concurrent_runs_share_one_server_which_stops_when_idle(cache: Path, tmp_path: Path) -> None:
    env = {**os.environ, **env_for(cache)}
    env = {k: v for k, v in env.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "LOOPSTREAM_PROVIDER",
                                                             "LOOPSTREAM_MODEL", "LOOPSTREAM_LOCAL_SHARED"))}
    runs = []
    for name, goal in (("a", "What is 40213 + 1999? Use the add tool."), ("b", "What is 2 + 3? Use the add tool.")):
        (tmp_path / name).mkdir()
        runs.append(subprocess.Popen([sys.executable, "-m", "loopstream.cli.app", "run", "-q", goal],
                                     cwd=tmp_path / name, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True))
    seen: set[int] = set()
    ports: set[int] = set()
    mapped_by_runs = False
    while any(r.poll() is None for r in runs):
        seen |= llama_servers(cache)
        if (state := the_state(cache)) is not None:
            ports.add(state.port)
        mapped_by_runs |= any(maps_model(r.pid) for r in runs)
        time.sleep(0.25)
    outs = [r.communicate(timeout=60) for r in runs]
    for r, (out, err) in zip(runs, outs, strict=True):
        assert r.returncode == 0, err[-2000:]
    assert "42212" in outs[0][0] and "5" in outs[1][0]
    assert len(seen) == 1 and len(ports) == 1  # one llama.cpp server, on one port, for both runs
    assert not mapped_by_runs  # neither run loaded the model itself
    (server,) = seen
    # Nobody uses it any more: it stops by itself after the idle time (3 s here).
    wait_for(lambda: not pid_alive(server), 120, "the idle server to stop")
    assert the_state(cache) is None and not list((cache / "servers").glob("*.lease"))
    assert "stopping: no client for 3s" in next((cache / "servers").glob("*.log")).read_text()


LEASE_HOLDER = """
import sys, time
from loopstream.providers.local_shared import SharedLocalServer
server = SharedLocalServer(idle=float(sys.argv[1])).start()
print(server.state.pid, flush=True)
time.sleep(600)
"""


@needs_model
@pytest.mark.slow
def test_a_stale_state_is_replaced_and_a_crashed_client_does_not_keep_the_server(
        cache: Path, permissive: Permissive, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPSTREAM_CACHE_DIR", str(cache))
    model = cache / MODEL_FILE
    servers = cache / "servers"
    servers.mkdir()
    key = server_key(model)
    stale = ServerState(pid=dead_pid(), started=None, port=permissive.port, token="old", model=str(model),
                        lease=f"{key}.1.lease")
    stale.write(servers / f"{key}.json")

    with SharedLocalServer(idle=2) as mine:
        assert mine.state is not None and mine.state.pid != stale.pid and mine.state.port != permissive.port
        assert llama_servers(cache) == {mine.state.pid}
        provider = SharedLocalProvider(mine)
        assert provider.count_tokens([Message(role="user", content="hi")]) > 0  # it serves, with its token
        # Another run attaches to the same server, then dies without a word (SIGKILL).
        holder = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, "2"], env={**os.environ},
                                  stdout=subprocess.PIPE, text=True)
        assert int(holder.stdout.readline()) == mine.state.pid
        holder.kill()
        holder.wait()
        server = mine.state.pid
    # The other server was left alone; ours stops once nobody holds a lease, the crashed run included.
    assert httpx.get(f"http://127.0.0.1:{permissive.port}/v1/models").status_code == 200
    wait_for(lambda: not pid_alive(server), 120, "the idle server to stop")
    assert the_state(cache) is None


@needs_model
@pytest.mark.slow
def test_a_run_whose_server_died_moves_to_a_new_one(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPSTREAM_CACHE_DIR", str(cache))
    with SharedLocalServer(idle=2) as shared:
        provider = SharedLocalProvider(shared, timeout=300)
        convo = [Message(role="user", content="Say OK.")]
        short = Sampling(max_output_tokens=4)
        assert provider.complete(convo, [], short).output_tokens > 0
        first = shared.state
        os.kill(first.pid, signal.SIGKILL)  # the server process dies (OOM killer, a person)
        wait_for(lambda: not pid_alive(first.pid), 30, "the killed server to go")
        with pytest.raises(ProviderError) as failed:
            provider.complete(convo, [], short)
        assert failed.value.retryable  # the orchestrator retries ...
        reply = provider.complete(convo, [], short)  # ... and the retry reaches a new server
        assert reply.output_tokens > 0 and shared.state.pid != first.pid
        assert llama_servers(cache) == {shared.state.pid}


@needs_model
@pytest.mark.slow
def test_opting_out_runs_the_server_in_the_run_itself(cache: Path, tmp_path: Path) -> None:
    r = cli("run", "What is 2 + 3? Use the add tool.", "-q", cwd=tmp_path,
            env={**env_for(cache), "LOOPSTREAM_LOCAL_SHARED": "0"}, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "5"
    assert supervisors(cache) == set() and not (cache / "servers").exists()
