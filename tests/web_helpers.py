"""Shared by the inspector's tests: a real server over a real SQLite log, in a thread."""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from loopstream.core.policy import SessionPolicy
from loopstream.web.app import ServerSettings, create_app
from loopstream.web.runner import RunSettings
from loopstream.web.serve import Running, in_thread

ASK_ADD = SessionPolicy().updated({"permissions": {"rules": [{"tool": "add", "action": "ask"}]}})


@contextmanager
def serving(db: Path, *, model: str = "adder:2", policy: SessionPolicy | None = None, token: str | None = None,
            host: str = "127.0.0.1", tools: tuple[str, ...] = ("add",), workdir: Path = Path("."),
            models: tuple[str, ...] | None = ()) -> Iterator[Running]:
    run = RunSettings(db=db, provider="scripted", model=model, tools=list(tools), policy=policy or SessionPolicy(),
                      workdir=workdir, models=models)
    running = in_thread(create_app(run, ServerSettings(host=host, token=token)), host)
    try:
        yield running
    finally:
        running.stop()


def wait_for(check: Callable[[], object], timeout: float = 10.0, every: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {check}")
        time.sleep(every)


def sse(client: httpx.Client, path: str, headers: dict | None = None, until: str = "end") -> list[tuple[str, dict]]:
    """The (event kind, data) messages of an event stream, up to and including `until`."""
    out: list[tuple[str, dict]] = []
    with client.stream("GET", path, headers=headers or {}, timeout=10) as response:  # a keepalive comes every 15 s
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        kind, data = "message", ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
            elif line == "" and data:
                out.append((kind, json.loads(data)))
                if kind == until:
                    return out
                kind, data = "message", ""
    return out


def post(client: httpx.Client, path: str, body: object) -> httpx.Response:
    """POST `body` as JSON (any text: lone surrogates go as JSON escapes)."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
