"""A broker that loses its state (Tansu restarted on the same port: it keeps topics in memory
only): the loss is detected and said once, workers stop taking work and still stop on
request, `loopstream kafka restore` brings every session back, and the workers resume."""
from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("confluent_kafka", reason="needs confluent-kafka")

from loopstream.core.log import LogLost
from loopstream.core.state import fold
from loopstream.kafka.contract import parse_kafka_url
from loopstream.kafka.log import KafkaLog
from loopstream.kafka.ops import WorkerOps
from loopstream.kafka.restore import RestoreRefused, restore
from loopstream.kafka.settings import KafkaSettings
from loopstream.providers.scripted import ScriptedProvider, adder_script
from loopstream.runtime.assembly import processors_for
from loopstream.runtime.worker import Worker
from loopstream.runtime.writer import SessionConfig, SessionWriter
from tests.helpers import wait_for
from tests.test_kafka_workers import Workers, bus_url, free_port, samples, scrape
from tests.test_worker import check_session

pytestmark = pytest.mark.kafka
FAST = {"session.timeout.ms": "2000", "heartbeat.interval.ms": "500", "fetch.wait.max.ms": "20"}
CONFIG = SessionConfig(provider="scripted", model="adder", tools=["add"])


def open_log(broker: str, prefix: str, path: Path) -> KafkaLog:
    return KafkaLog(broker, f"{prefix}.events", path, consumer_config=FAST, settings=KafkaSettings(), timeout=15)


def start(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def stop(worker: Worker, thread: threading.Thread, within: float) -> float:
    began = time.monotonic()
    worker.stop()
    thread.join(within)
    assert not thread.is_alive(), "the worker did not stop"
    return time.monotonic() - began


def done(log: KafkaLog, sids: list[str]) -> bool:
    return all(fold(log.read(s)).status == "done" for s in sids)


def test_broker_state_loss_is_detected_and_restore_brings_every_session_back(
        restartable_broker, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="loopstream.kafka")
    broker, prefix = restartable_broker, f"rec{uuid.uuid4().hex[:8]}"
    orch_log = open_log(broker.bootstrap, prefix, tmp_path / "orch.db")
    model_log = open_log(broker.bootstrap, prefix, tmp_path / "model.db")
    tool_log = open_log(broker.bootstrap, prefix, tmp_path / "tool.db")
    orch = Worker(orch_log, processors_for("orchestrator"), f"{prefix}.orchestrator")
    model = Worker(model_log, processors_for("model", provider=ScriptedProvider(adder_script(2))), f"{prefix}.model")
    tools = Worker(tool_log, processors_for("tool"), f"{prefix}.tool")
    idle_log = open_log(broker.bootstrap, prefix, tmp_path / "idle.db")
    idle = Worker(idle_log, processors_for("tool"), f"{prefix}.idle")  # stopped while the log is lost
    threads = {w: start(w) for w in (orch, model, tools, idle)}
    writer = SessionWriter(orch_log)
    finished = [writer.start(f"goal {i}", CONFIG) for i in range(3)]
    assert wait_for(lambda: done(orch_log, finished), 60), (
        [fold(orch_log.read(s)).status for s in finished], [(w.group, w.stats.snapshot(), w.poll_error) for w in threads])
    stop(model, threads.pop(model), 30)  # the next sessions wait for a model
    waiting = [writer.start(f"later {i}", CONFIG) for i in range(3)]
    assert wait_for(lambda: all(fold(orch_log.read(s)).status == "awaiting_model" for s in waiting), 30)
    before = {s: [e.event_id for e in orch_log.read(s)] for s in finished + waiting}

    broker.stop()  # Tansu keeps topics in memory: restarted, it has lost them all
    broker.start()
    assert wait_for(lambda: orch.lost is not None and tools.lost is not None and idle.lost is not None, 30)
    said = [r.getMessage() for r in caplog.records if "BROKER STATE LOST" in r.getMessage()]
    assert said and all("loopstream kafka restore" in m for m in said), (said, orch.lost, orch_log.lost, tools.lost)
    assert len(said) <= 3, said  # once per log, not once per retry
    ops = WorkerOps(orch, "orchestrator")
    ok, why = ops.ready()
    assert not ok and why.startswith("lost: ") and ops.live()[0], why
    time.sleep(1.5)
    assert orch.stats.snapshot().get("handler_errors", 0) == 0  # no retry storm
    assert stop(idle, threads.pop(idle), 10) < 5  # SIGTERM's stop() works while lost
    idle_log.close()

    restored = restore(parse_kafka_url(f"kafka://{broker.bootstrap}?prefix={prefix}", KafkaSettings()),
                       tmp_path / "orch.db")
    assert restored.sessions == 6 and restored.events == sum(len(v) for v in before.values())
    assert restored.backup.is_file()
    assert wait_for(lambda: orch.lost is None, 30)  # the orchestrator resumes by itself
    with pytest.raises(RestoreRefused, match="nothing was lost"):  # its projection is of the restored topic
        restore(parse_kafka_url(f"kafka://{broker.bootstrap}?prefix={prefix}", KafkaSettings()), tmp_path / "orch.db")
    model_log2 = open_log(broker.bootstrap, prefix, tmp_path / "model2.db")
    model2 = Worker(model_log2, processors_for("model", provider=ScriptedProvider(adder_script(2))),
                    f"{prefix}.model")
    threads[model2] = start(model2)
    # 120 s: on three busy test workers the group's rebalance onto the restored topic's new
    # partition count has taken over 60 s (one CI run); alone it takes a few seconds
    assert wait_for(lambda: done(orch_log, finished + waiting), 120), (
        [fold(orch_log.read(s)).status for s in finished + waiting],
        [fold(model_log2.read(s)).status for s in finished + waiting], model2.stats.snapshot(), orch.stats.snapshot(),
        model2.lost, model2.poll_error, tools.lost, tools.stats.snapshot(), tool_log.lost, tools._parts and {p: len(t) for p, t in tools._parts.items()})
    for s in finished:  # what had ended is back byte for byte
        assert [e.event_id for e in orch_log.read(s)] == before[s]
    for s in finished + waiting:
        check_session(orch_log, s)
        assert [e.event_id for e in model_log2.read(s)] == [e.event_id for e in orch_log.read(s)]
        assert fold(orch_log.read(s)).answer == "The result is 2."
    for w, t in threads.items():
        stop(w, t, 30)
    for log in (orch_log, model_log, model_log2, tool_log):
        log.close()


def test_a_process_opening_a_stale_projection_is_lost_until_restored(restartable_broker, tmp_path: Path) -> None:
    broker, prefix = restartable_broker, f"rec{uuid.uuid4().hex[:8]}"
    with open_log(broker.bootstrap, prefix, tmp_path / "p.db") as log:
        sid = SessionWriter(log).start("goal", CONFIG)
    broker.stop()
    broker.start()
    stale = open_log(broker.bootstrap, prefix, tmp_path / "p.db")  # a worker restarted after the loss
    try:
        assert stale.lost and "recreated" in stale.lost
        with pytest.raises(Exception, match="lost the log"):
            stale.read(sid)
    finally:
        stale.close()
    restore(parse_kafka_url(f"kafka://{broker.bootstrap}?prefix={prefix}", KafkaSettings()), tmp_path / "p.db")
    with open_log(broker.bootstrap, prefix, tmp_path / "p.db") as again:
        assert again.lost is None
        assert [e.type for e in again.read(sid)][:2] == ["SessionStarted", "GoalReceived"]


def test_a_projection_ahead_of_the_topic_is_a_loss(kafka_broker: str, tmp_path: Path) -> None:
    """Same topic id, but the topic ends before the projection's position (a broker restored
    from an older snapshot): the record before the position cannot be fetched."""
    prefix = f"rec{uuid.uuid4().hex[:8]}"
    with open_log(kafka_broker, prefix, tmp_path / "p.db") as log:
        sid = SessionWriter(log).start("goal", CONFIG)
        p = log.partition(sid)
        end = log.projection.positions()[p]
    with sqlite3.connect(tmp_path / "p.db") as db:  # as if it had read records the broker no longer has
        db.execute("UPDATE positions SET next_off = ? WHERE part = ?", (end + 50, p))
    ahead = open_log(kafka_broker, prefix, tmp_path / "p.db")
    try:
        with pytest.raises(LogLost, match="beyond the topic's end"):
            ahead.read(sid)
        assert "beyond the topic's end" in (ahead.lost or "")
    finally:
        ahead.close()
    with open_log(kafka_broker, prefix, tmp_path / "q.db") as fresh:  # a true position is not a loss
        assert fresh.read(sid)[0].type == "SessionStarted" and fresh.lost is None
        fresh.catch_up()
        assert fresh.lost is None


def test_restore_refuses_a_missing_projection_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPSTREAM_")}
    done = subprocess.run([sys.executable, "-m", "loopstream.cli.app", "kafka", "restore", "--bus",
                           "kafka://127.0.0.1:9?prefix=x", "--db", str(tmp_path / "none.db")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "no projection at" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_worker_process_reports_the_loss_on_readyz_and_stops_on_sigterm(restartable_broker, tmp_path: Path) -> None:
    broker, prefix = restartable_broker, f"rec{uuid.uuid4().hex[:8]}"
    workers = Workers(bus_url(broker.bootstrap, prefix), tmp_path)
    port = free_port()
    proc = workers.start("tool", "--metrics-port", str(port), model=None)
    try:
        assert wait_for(lambda: scrape(port, "/readyz")[0] == 200, 60), workers.logs()
        with open_log(broker.bootstrap, prefix, tmp_path / "w.db") as log:  # a session its projection holds
            SessionWriter(log).start("goal", CONFIG)

        def delivered() -> bool:
            found = samples(scrape(port, "/metrics")[1], "loopstream_worker_total")
            return any('kind="delivered"' in k and v >= 2 for k, v in found.items())

        assert wait_for(delivered, 30), workers.logs()
        broker.stop()
        broker.start()
        assert wait_for(lambda: "lost: " in scrape(port, "/readyz")[1], 30), workers.logs()
        assert scrape(port, "/readyz")[0] == 503 and scrape(port, "/healthz")[0] == 200
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, workers.logs()
        assert time.monotonic() - began < 10
        said = workers.logs()
        assert said.count("KAFKA BROKER STATE LOST") == 1 and "loopstream kafka restore" in said, said
    finally:
        workers.stop_all()
