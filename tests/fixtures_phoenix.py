"""A real Arize Phoenix (the `[otel-test]` extra) as the OTLP receiver: started headless on
free 127.0.0.1 ports with its own working directory (its SQLite database), offline, once
per test session; the tests read back what it stored through its REST API."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_S = 180.0  # migrations and the app's start take 20-60 s on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Phoenix:
    url: str
    log: Path

    def spans(self, project: str, limit: int = 1000) -> list[dict]:
        """Every span Phoenix stored for `project` (its REST API)."""
        out: list[dict] = []
        cursor = ""
        while True:
            query = f"?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/projects/{project}/spans{query}", timeout=10) as r:
                    page = json.load(r)
            except urllib.error.HTTPError as exc:
                if exc.code == 404:  # no span has reached the project yet
                    return []
                raise
            out += page["data"]
            cursor = page.get("next_cursor") or ""
            if not cursor:
                return out

    def wait_spans(self, project: str, count: int, timeout: float = 30.0) -> list[dict]:
        """The project's spans once at least `count` are stored (Phoenix inserts in batches)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans(project)
            if len(spans) >= count or time.monotonic() > deadline:
                return spans
            time.sleep(0.3)


@pytest.fixture(scope="session")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phoenix]:
    pytest.importorskip("phoenix", reason="needs the [otel-test] extra (arize-phoenix)")
    work = tmp_path_factory.mktemp("phoenix")
    port = free_port()
    env = {**os.environ, "PHOENIX_HOST": "127.0.0.1", "PHOENIX_PORT": str(port),
           "PHOENIX_GRPC_PORT": str(free_port()), "PHOENIX_WORKING_DIR": str(work),
           "PHOENIX_TELEMETRY_ENABLED": "false", "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false"}
    log = work / "phoenix.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "phoenix.server.main", "serve"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"phoenix exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"phoenix did not answer on {url} within {STARTUP_S:.0f} s: "
                                   f"{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield Phoenix(url, log)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
