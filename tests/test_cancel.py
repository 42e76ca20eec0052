"""Cancel reaches work in flight (docs/architecture.md#cancelling-work-in-flight): the token
(core/cancel.py), every provider adapter against a real loopback server that answers only
after 30 s, and `loopstream run` in a real subprocess cancelled by a real `loopstream cancel`
or by Ctrl-C. Bounds on time are generous: they prove an interruption (the uninterrupted
call takes 30 or 60 s), they are not performance figures."""
from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loopstream.core import cancel
from loopstream.core import events as ev
from loopstream.core.sqlite_log import LogUnavailable, SQLiteLog
from loopstream.providers.anthropic import AnthropicProvider
from loopstream.providers.base import Message, Provider, ProviderError
from loopstream.providers.openai_compat import OpenAICompatProvider
from loopstream.providers.scripted import ScriptedProvider, scripted_from_spec
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig
from loopstream.runtime.watch import EndWatcher
from loopstream.runtime.writer import SessionWriter
from tests.helpers import wait_for

SLOW_S = 30.0  # how long the slow server holds a request before it answers
GOAL = [Message(role="user", content="tell me a long story")]


# -- a real slow server ----------------------------------------------------------------------
class SlowServer:
    """A loopback HTTP server that reads a request, sends nothing for SLOW_S seconds, then a
    valid reply (OpenAI or Anthropic shape, by path); a body mentioning "quick" is answered
    at once. It records when each held request arrived and when its client hung up."""

    def __init__(self) -> None:
        self.held = threading.Event()  # a slow request is being held
        self.hung_up: list[float] = []  # monotonic times at which a held client closed
        self.answered = 0
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                while outer._serve_one(self.request):
                    pass

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _serve_one(self, sock: socket.socket) -> bool:
        """One request on a kept-alive connection; False once the client has gone."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += sock.recv(65536)
        if b"quick" not in body:
            self.held.set()
            sock.settimeout(SLOW_S)
            try:
                if sock.recv(1) == b"":  # nothing more is sent: an empty read is the client hanging up
                    self.hung_up.append(time.monotonic())
                    return False
            except TimeoutError:
                pass
        path = head.split(b" ")[1]
        reply = ({"content": [{"type": "text", "text": "late"}], "usage": {}} if path.endswith(b"/v1/messages")
                 else {"choices": [{"message": {"content": "late"}, "finish_reason": "stop"}], "usage": {}})
        payload = json.dumps(reply).encode()
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        self.answered += 1
        return True

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def slow() -> Iterator[SlowServer]:
    server = SlowServer()
    yield server
    server.close()


# -- the token --------------------------------------------------------------------------------
def test_a_thread_waited_on_under_a_token_is_left_as_soon_as_the_token_is_cancelled() -> None:
    token = cancel.Cancel()
    threading.Timer(0.2, token.cancel, args=("enough",)).start()
    started = time.monotonic()
    with cancel.scope(token), pytest.raises(cancel.Interrupted, match="enough"):
        cancel.run_in_thread(lambda: time.sleep(SLOW_S))  # a plain sleep: the thread is abandoned
    assert time.monotonic() - started < 10


def test_helper_threads_are_reused_and_an_abandoned_one_holds_up_no_later_call(monkeypatch) -> None:
    pool = cancel._Helpers(idle_exit_s=0.5)
    monkeypatch.setattr(cancel, "_POOL", pool)
    token = cancel.Cancel()
    with cancel.scope(token):
        first = cancel.run_in_thread(threading.get_ident, name="loopstream-a")
        assert wait_for(lambda: pool.idle() == 1, 5)
        assert cancel.run_in_thread(threading.get_ident) == first  # the idle thread took the job
        assert cancel.run_in_thread(lambda: threading.current_thread().name, name="loopstream-b") == "loopstream-b"
        release = threading.Event()
        with pytest.raises(TimeoutError):
            cancel.run_in_thread(lambda: release.wait(SLOW_S), timeout=0.1)  # abandoned, still running
        assert cancel.run_in_thread(lambda: 42, timeout=5) == 42  # another thread, at once
        with pytest.raises(ValueError, match="boom"):
            cancel.run_in_thread(lambda: int("boom"))
        release.set()
    assert wait_for(lambda: pool.idle() == 2, 5), "the abandoned thread did not rejoin the pool when it returned"
    assert wait_for(lambda: pool.idle() == 0, 10), "idle helper threads did not exit"


def test_leaving_a_scope_by_an_exception_stops_what_the_work_registered() -> None:
    token, stopped = cancel.Cancel(), []
    with pytest.raises(KeyboardInterrupt), cancel.scope(token):
        cancel.current().on_cancel(lambda: stopped.append("the subprocess"))
        raise KeyboardInterrupt
    assert stopped == ["the subprocess"] and token.cancelled
    assert cancel.current() is cancel.NEVER
    with pytest.raises(RuntimeError):
        cancel.NEVER.cancel()


def test_the_watcher_thread_runs_only_while_a_handler_is_in_flight(tmp_path: Path) -> None:
    watcher = EndWatcher(SQLiteLog(tmp_path / "l.db"), interval=0.05)
    with watcher.guard("s", 0):
        assert watcher._thread is not None
    assert wait_for(lambda: watcher._thread is None, 5), "the watcher thread outlived its last handler"


# -- every adapter ----------------------------------------------------------------------------
def adapters(slow: SlowServer) -> dict[str, Provider]:
    return {
        "openai-compatible": OpenAICompatProvider(f"{slow.url}/v1", None, "m", timeout=120),
        "anthropic": AnthropicProvider("key", "claude-x", slow.url, timeout=120),
    }


@pytest.mark.parametrize("kind", ["openai-compatible", "anthropic", "scripted"])
def test_every_adapter_stops_its_call_within_a_second_or_so_of_a_cancel(slow: SlowServer, kind: str) -> None:
    provider = scripted_from_spec(f"slow:{SLOW_S}") if kind == "scripted" else adapters(slow)[kind]
    token, outcome = cancel.Cancel(), {}

    def call() -> None:
        with cancel.scope(token):
            try:
                outcome["reply"] = provider.complete(GOAL, [])
            except cancel.Interrupted as exc:
                outcome["interrupted"] = str(exc)
            outcome["at"] = time.monotonic()

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    if kind == "scripted":
        time.sleep(0.5)
    else:
        assert slow.held.wait(10), "the request never reached the server"
    cancelled_at = time.monotonic()
    token.cancel("a person cancelled the session")
    caller.join(SLOW_S + 10)
    assert outcome.get("interrupted") == "a person cancelled the session", outcome
    assert outcome["at"] - cancelled_at < 5
    if kind != "scripted":
        assert wait_for(lambda: slow.hung_up, 5), "the server never saw the connection drop"
        assert slow.hung_up[0] - cancelled_at < 5 and slow.answered == 0
        again = provider.complete([Message(role="user", content="quick")], [])  # no scope: not interruptible
        assert again.text == "late"  # the client's pool is whole after a cancel


def test_a_call_through_the_environments_proxy_is_dropped_too(slow: SlowServer, monkeypatch) -> None:
    """The adapters' clients keep httpx's own handling of HTTP_PROXY (the slow server acts as
    the proxy here), and the proxied connection is dropped on a cancel as well."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", slow.url)
    provider = OpenAICompatProvider("http://model.invalid/v1", None, "m", timeout=120)
    token = cancel.Cancel()
    threading.Timer(0.5, token.cancel).start()
    with cancel.scope(token), pytest.raises(cancel.Interrupted):
        provider.complete(GOAL, [])
    assert slow.held.is_set(), "the request did not go through the proxy"
    assert wait_for(lambda: slow.hung_up, 5), "the proxy never saw the connection drop"


# -- the CLI ----------------------------------------------------------------------------------
def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loopstream.cli", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
                            **popen)


def only_session(db: Path) -> str:
    def one() -> str | None:
        try:
            with SQLiteLog(db, readonly=True) as log:
                infos = log.sessions()
        except LogUnavailable:  # not there yet, or its tables not yet created
            return None
        return infos[0].session_id if infos and infos[0].next_seq > 2 else None  # its model call requested

    sid = wait_for(one, 60)
    assert sid, f"no session started in {db}"
    return sid


def cancel_from_another_process(tmp_path: Path, run: subprocess.Popen) -> tuple[str, float]:
    """`loopstream cancel` in a process of its own; the run's stderr and its exit, seconds after the cancel."""
    sid = only_session(tmp_path / "l.db")
    done = subprocess.run([sys.executable, "-m", "loopstream.cli", "cancel", sid, "--db", "l.db",
                           "--reason", "changed my mind"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    cancelled_at = time.monotonic()
    _, err = run.communicate(timeout=SLOW_S * 2)
    return err, time.monotonic() - cancelled_at


def test_run_cancelled_from_another_terminal_stops_its_slow_model_call_and_says_who(tmp_path: Path) -> None:
    run = cli("run", "--db", "l.db", "--provider", "scripted", "--model", "slow:60", "add one", cwd=tmp_path)
    err, after = cancel_from_another_process(tmp_path, run)
    assert run.returncode == 1, err
    assert after < 10, f"run exited {after:.1f}s after the cancel (its model call takes 60 s)"
    assert "was cancelled by person:" in err and "changed my mind" in err
    assert "Traceback" not in err


def test_run_cancelled_from_another_terminal_drops_its_http_request(tmp_path: Path, slow: SlowServer) -> None:
    run = cli("run", "--db", "l.db", "--base-url", f"{slow.url}/v1", "--model", "m", "--tools", "add", "tell a story",
              cwd=tmp_path, env={"OPENAI_API_KEY": ""})
    assert slow.held.wait(60), "the model request never reached the server"
    err, after = cancel_from_another_process(tmp_path, run)
    assert run.returncode == 1 and "was cancelled by person:" in err, err
    assert after < 10 and slow.hung_up and slow.answered == 0, (after, slow.hung_up)


def test_ctrl_c_in_run_drops_the_http_request_in_flight(tmp_path: Path, slow: SlowServer) -> None:
    run = cli("run", "--db", "l.db", "--base-url", f"{slow.url}/v1", "--model", "m", "--tools", "add", "tell a story",
              cwd=tmp_path, env={"OPENAI_API_KEY": ""},
              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as at a terminal
    assert slow.held.wait(60), "the model request never reached the server"
    interrupted_at = time.monotonic()
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=SLOW_S * 2)
    assert run.returncode == 130 and "loopstream resume" in err, err
    assert time.monotonic() - interrupted_at < 10
    assert wait_for(lambda: slow.hung_up, 5) and slow.answered == 0, "the server kept the request"


def test_a_cancel_during_a_retry_backoff_ends_the_inline_run_without_waiting_it_out(tmp_path: Path) -> None:
    """A model asked for a 60 s pause (Retry-After): the driver waits on the clock, not in a
    handler, and still sees the cancel within its watch interval."""
    busy = ProviderError("overloaded", retryable=True, status=529, retry_after=60, kind="overloaded")
    with SQLiteLog(tmp_path / "l.db") as log:
        runtime = build_runtime(log, ScriptedProvider([busy]))
        sid = runtime.start_session("x", SessionConfig(provider="scripted", model="scripted", tools=[]))
        ended: dict[str, Any] = {}
        driver = threading.Thread(target=lambda: ended.update(state=runtime.run_session(sid), at=time.monotonic()))
        driver.start()
        assert wait_for(lambda: log.read(sid)[-1].type == "RetryScheduled", 10)
        SessionWriter(SQLiteLog(tmp_path / "l.db")).record(sid, [ev.SessionCancelled(reason="no")], actor="person:ada")
        cancelled_at = time.monotonic()
        driver.join(90)
        assert ended["state"].status == "cancelled" and ended["at"] - cancelled_at < 10
