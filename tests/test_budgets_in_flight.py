"""Budgets bound the call in flight, not only the next step: the model call gets the time
left of the wall-time budget as its deadline and a reply cap of the tokens left of the token
budget, and a session the last reply pushed over a budget fails naming it. Against a real
OpenAI-compatible HTTP server on loopback (slow or recording), through the Python API and
the real CLI."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loopstream.core.sqlite_log import SQLiteLog
from loopstream.providers.openai_compat import OpenAICompatProvider
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.writer import SessionConfig


class ChatServer(ThreadingHTTPServer):
    """/v1/chat/completions on 127.0.0.1: waits `delay` seconds (or until the client hangs
    up), then answers `text` reporting `usage`; records every request body."""

    daemon_threads = True

    def __init__(self, delay: float = 0.0, text: str = "42", usage: tuple[int, int] = (50, 5)) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.delay, self.text, self.usage = delay, text, usage
        self.bodies: list[dict] = []
        self.hung_up = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        deadline = time.monotonic() + self.server.delay
        while time.monotonic() < deadline:
            time.sleep(0.05)
        reply = {"model": "m", "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": self.server.text}}],
                 "usage": {"prompt_tokens": self.server.usage[0], "completion_tokens": self.server.usage[1]}}
        data = json.dumps(reply).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.server.hung_up.set()


@pytest.fixture
def serve() -> Iterator:
    started: list[ChatServer] = []

    def start(**kw) -> ChatServer:
        server = ChatServer(**kw)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def run_session(tmp_path: Path, server: ChatServer, budgets: dict) -> tuple[object, list, float]:
    provider = OpenAICompatProvider(server.url, None, "m", "native", 120.0)  # the client alone would wait 120 s
    with SQLiteLog(tmp_path / "b.db") as log:
        rt = build_runtime(log, provider)
        sid = rt.start_session("What is 6 * 7?", SessionConfig(
            provider="openai", model="m", tools=[], policy={"budgets": budgets, "retries": {"base_ms": 10}}))
        began = time.monotonic()
        state = rt.run_session(sid)
        return state, log.read(sid), time.monotonic() - began


def test_a_slow_model_call_is_cut_at_the_time_budget_and_the_session_fails_naming_it(tmp_path, serve) -> None:
    server = serve(delay=30.0)
    state, events, took = run_session(tmp_path, server, {"max_wall_seconds": 1.5})
    assert state.status == "failed" and state.error.startswith("time budget"), state.error
    assert events[-1].payload.error_kind == "budget_time"
    failed = [e.payload for e in events if e.type == "ModelFailed"]
    assert failed and failed[0].error_kind == "timeout"
    assert took < 15, f"the call was not bounded by the budget: {took:.1f}s"  # uncut: 30 s per attempt


def test_the_reply_is_capped_at_the_tokens_left_of_the_budget(tmp_path, serve) -> None:
    server = serve(usage=(50, 5))
    state, _, _ = run_session(tmp_path, server, {"max_tokens": 300})
    assert state.status == "done" and state.answer == "42"
    (body,) = server.bodies
    assert 1 <= body["max_tokens"] < 300  # the prompt is paid for out of the same 300
    state, _, _ = run_session(tmp_path / "big", server, {"max_tokens": 1_000_000})
    assert server.bodies[-1]["max_tokens"] == 1024  # a roomy budget leaves the session's own cap


def test_a_reply_that_reports_more_tokens_than_the_budget_fails_the_session(tmp_path, serve) -> None:
    server = serve(usage=(90_000, 10_000))
    state, events, _ = run_session(tmp_path, server, {"max_tokens": 1000})
    assert state.status == "failed" and state.answer is None
    assert events[-1].type == "SessionFailed" and events[-1].payload.error_kind == "budget_tokens"


def test_the_cli_bounds_a_run_by_max_seconds(tmp_path, serve) -> None:
    server = serve(delay=30.0)
    began = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "loopstream.cli.app", "run", "What is 6 * 7?", "--provider", "openai",
                        "--base-url", server.url, "--model", "m", "--max-seconds", "2", "-q"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    took = time.monotonic() - began
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "time budget" in r.stderr and "Traceback" not in r.stderr
    assert took < 20, f"run took {took:.1f}s under --max-seconds 2"
