"""A worker's operations surface (kafka/ops.py) over a real SQLite log: readiness follows the
poll loop, liveness follows the loop and its helpers; the Kafka side is in
tests/test_kafka_workers.py (`test_the_worker_serves_health_and_metrics`)."""
from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client", reason="needs prometheus-client (the [kafka] extra)")

from loopstream.core.sqlite_log import SQLiteLog
from loopstream.kafka.background import BackgroundLoop
from loopstream.kafka.ops import OpsError, WorkerOps
from loopstream.runtime.worker import Worker


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Dies(BackgroundLoop):
    label = "goal intake"

    def _loop(self) -> None:
        raise RuntimeError("broker gone")


def test_ready_once_polling_live_until_a_helper_dies(tmp_path: Path) -> None:
    with SQLiteLog(tmp_path / "l.db") as log:
        worker = Worker(log, [], "ops-test", poll_timeout=0.05)
        helper = Dies("ls-test")
        ops = WorkerOps(worker, "tool", helpers=[helper], stale_after=5)
        port = ops.serve(0)
        try:
            assert get(port, "/readyz") == (503, "starting\n")
            assert get(port, "/healthz") == (200, "ok\n")
            runner = threading.Thread(target=worker.run, daemon=True)
            runner.start()
            deadline = time.monotonic() + 10
            while get(port, "/readyz")[0] != 200:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            metrics = get(port, "/metrics")[1]
            assert 'loopstream_ready{role="tool"} 1.0' in metrics
            assert 'loopstream_sessions{state="open"} 0.0' in metrics
            assert "loopstream_consumer_lag" in metrics  # declared, no series without Kafka
            helper.start()
            helper.join(5)
            assert get(port, "/healthz") == (503, "stopped: goal intake\n")
            assert get(port, "/readyz")[0] == 503
            worker.stop()
            runner.join(10)
            assert get(port, "/metrics")[0] == 200
        finally:
            ops.close()


def test_a_taken_port_is_one_line(tmp_path: Path) -> None:
    with SQLiteLog(tmp_path / "l.db") as log:
        first = WorkerOps(Worker(log, [], "a"), "tool")
        port = first.serve(0)
        try:
            with pytest.raises(OpsError, match=rf"cannot serve metrics on 127.0.0.1:{port}"):
                WorkerOps(Worker(log, [], "b"), "tool").serve(port)
        finally:
            first.close()
