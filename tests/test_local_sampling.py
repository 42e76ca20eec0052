"""A real llama.cpp server reached through `--base-url` (as a user points loopstream at any
OpenAI-compatible server): every call carries the session's sampling settings (not the
server's defaults: temperature 0.8, no cap), SessionStarted records them, and a reply that
is empty or cut at the cap never ends the session `done`.

Between the CLI and llama.cpp sits a real loopback HTTP proxy that keeps each request body."""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from loopstream.providers.local import MODEL_NAME
from tests.test_cli import cli

pytestmark = [pytest.mark.local, pytest.mark.slow]
GOAL = "What is 40213 + 1999? Use the add tool."


class CapturingProxy(ThreadingHTTPServer):
    """Forwards every request to `upstream` and keeps the JSON bodies sent to chat/completions."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = upstream.rstrip("/")
        self.bodies: list[dict[str, Any]] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Forward(BaseHTTPRequestHandler):
    server: CapturingProxy

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path.endswith("/chat/completions"):
            self.server.bodies.append(json.loads(body))
        root = self.server.upstream.removesuffix("/v1")
        reply = httpx.post(root + self.path, content=body, headers={"content-type": "application/json"},
                           timeout=900)
        self.send_response(reply.status_code)
        self.send_header("content-type", reply.headers.get("content-type", "application/json"))
        self.send_header("content-length", str(len(reply.content)))
        self.end_headers()
        self.wfile.write(reply.content)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def proxy(local_server: Any) -> Iterator[CapturingProxy]:
    server = CapturingProxy(local_server.base_url)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_through(proxy: CapturingProxy, tmp_path: Path, *options: str) -> tuple[Any, Any]:
    """`loopstream run --base-url PROXY` in a subprocess; the session's SessionStarted and final state."""
    r = cli("run", GOAL, "--base-url", proxy.base_url, "--model", MODEL_NAME, *options, cwd=tmp_path, timeout=900)
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    with SQLiteLog(tmp_path / ".loopstream" / "loopstream.db") as log:
        (info,) = log.sessions()
        events = log.read(info.session_id)
    state = fold(events)
    assert r.returncode == (0 if state.status == "done" else 1), r.stderr[-2000:]
    assert not (state.status == "done" and not (state.answer or "").strip())  # never done with an empty answer
    return events[0].payload, state


def test_the_safe_defaults_go_on_the_wire_and_into_session_started(proxy: CapturingProxy, tmp_path: Path) -> None:
    started, state = run_through(proxy, tmp_path, "--max-steps", "1")  # one model call is enough to see it
    assert (started.provider, started.temperature, started.max_output_tokens, started.stop) == (
        "openai", 0.0, 1024, [])
    assert proxy.bodies and state.step == len(proxy.bodies) == 1
    body = proxy.bodies[0]
    assert (body["temperature"], body["max_tokens"]) == (0.0, 1024)
    assert not {"stop", "top_p", "seed"} & set(body)


def test_chosen_settings_are_sent_on_every_call_and_a_cut_answer_is_not_success(
        proxy: CapturingProxy, tmp_path: Path) -> None:
    # One output token: every reply is cut at the cap, so the model is told (twice) and the session fails.
    started, state = run_through(proxy, tmp_path, "--temperature", "0.3", "--max-output-tokens", "1",
                                 "--stop", "Observation:", "--max-steps", "6")
    assert (started.temperature, started.max_output_tokens, started.stop) == (0.3, 1, ["Observation:"])
    assert len(proxy.bodies) == 3
    for body in proxy.bodies:
        assert (body["temperature"], body["max_tokens"], body["stop"]) == (0.3, 1, ["Observation:"])
    assert state.status == "failed" and state.answer is None
    assert state.unfinished_answers == 3 and "output cap (1 tokens" in (state.error or "")


def test_an_empty_reply_from_a_real_server_is_retried_then_fails(proxy: CapturingProxy, tmp_path: Path) -> None:
    # json_text replies start with "{": stopping there leaves every reply empty.
    started, state = run_through(proxy, tmp_path, "--action-mode", "json_text", "--stop", "{", "--max-steps", "6")
    assert started.stop == ["{"] and all(body["stop"] == ["{"] for body in proxy.bodies)
    assert len(proxy.bodies) == 3
    assert state.status == "failed" and state.error == "the model's answers were empty 3 time(s)"
