"""runtime/worker.py over the SQLite log (fast, no broker): the same handlers as the embedded
runtime, driven by subscriptions; several groups; redelivery; clock waits; the contract codec."""
from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from loopstream.core.log import Log
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from loopstream.kafka.contract import (
    ContractError,
    Goal,
    SessionUpdate,
    decode_goal,
    decode_update,
    encode_goal,
    encode_update,
    parse_kafka_url,
)
from loopstream.providers.base import ProviderError
from loopstream.providers.scripted import ScriptedProvider, adder_script
from loopstream.runtime.assembly import processors_for
from loopstream.runtime.worker import Worker, _Partition
from loopstream.runtime.writer import SessionConfig, SessionWriter

CONFIG = SessionConfig(provider="scripted", model="scripted", tools=["add"])


def check_session(log: Log, sid: str) -> None:
    """Gapless seqs, one terminal event, each result event once per cause."""
    events = log.read(sid)
    assert [e.seq for e in events] == list(range(len(events)))
    assert len({e.event_id for e in events}) == len(events)
    results = Counter((e.type, e.causation_id) for e in events
                      if e.type in ("ModelResponded", "ModelFailed", "ToolCompleted", "ToolFailed",
                                    "ModelRequested", "ToolRequested", "SessionFinished"))
    assert max(results.values()) == 1, results
    assert sum(e.type in ("SessionFinished", "SessionFailed") for e in events) == 1


def run_workers(workers: list[Worker], done, timeout: float = 30) -> None:
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    try:
        while not done():
            assert time.monotonic() < deadline, [w.stats.snapshot() for w in workers]
            time.sleep(0.05)
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(10)


def all_done(log: Log, sids: list[str]):
    return lambda: all(fold(log.read(s)).terminal for s in sids)


def test_one_worker_all_processors(tmp_path: Path) -> None:
    log = SQLiteLog(tmp_path / "l.db")
    rt = SessionWriter(log)
    sids = [rt.start(f"goal {i}", CONFIG) for i in range(6)]
    w = Worker(log, processors_for("all", provider=ScriptedProvider(adder_script(2))), "t.all", concurrency=4)
    run_workers([w], all_done(log, sids))
    for s in sids:
        state = fold(log.read(s))
        assert state.status == "done" and state.answer == "The result is 2."
        check_session(log, s)
    assert w.stats.snapshot().get("handler_errors", 0) == 0


def test_separate_roles_and_redelivery(tmp_path: Path) -> None:
    log = SQLiteLog(tmp_path / "l.db")
    rt = SessionWriter(log)
    sids = [rt.start(f"goal {i}", CONFIG) for i in range(5)]
    provider = ScriptedProvider(adder_script(3))
    workers = [Worker(log, processors_for(r, provider=provider), f"t.{r}") for r in ("orchestrator", "model", "tool")]
    run_workers(workers, all_done(log, sids))
    before = [len(log.read(s)) for s in sids]
    for s in sids:
        check_session(log, s)
    calls = provider.calls
    # New groups read everything again from the start: a full redelivery changes nothing.
    again = [Worker(log, processors_for(r, provider=provider), f"t2.{r}") for r in ("orchestrator", "model", "tool")]
    total = sum(before)
    run_workers(again, lambda: all(w.stats.snapshot().get("delivered", 0) >= total for w in again))
    assert [len(log.read(s)) for s in sids] == before
    assert provider.calls == calls


def test_concurrent_sessions_do_not_wait_for_a_slow_one(tmp_path: Path) -> None:
    log = SQLiteLog(tmp_path / "l.db")
    rt = SessionWriter(log)
    slow = rt.start("slow", CONFIG)
    fast = [rt.start(f"fast {i}", CONFIG) for i in range(3)]
    release = threading.Event()
    inner = adder_script(1)

    def script(messages):
        if any(m.role == "user" and m.content == "slow" for m in messages):
            release.wait(20)
        return inner(messages)

    w = Worker(log, processors_for("all", provider=ScriptedProvider(script)), "t.slow", concurrency=4)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 20
        while not all(fold(log.read(s)).terminal for s in fast):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not fold(log.read(slow)).terminal
        release.set()
        while not fold(log.read(slow)).terminal:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        release.set()
        w.stop()
        t.join(10)
    check_session(log, slow)


def test_backoff_waits_on_the_clock(tmp_path: Path) -> None:
    log = SQLiteLog(tmp_path / "l.db")
    calls = {"n": 0}
    inner = adder_script(1)

    def script(messages):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ProviderError("busy", retryable=True, status=503)
        return inner(messages)

    config = SessionConfig(provider="scripted", model="scripted", tools=["add"], policy={"retries": {"base_ms": 400}})
    sid = SessionWriter(log).start("g", config)
    w = Worker(log, processors_for("all", provider=ScriptedProvider(script)), "t.backoff")
    run_workers([w], all_done(log, [sid]))
    types = [e.type for e in log.read(sid)]
    assert "RetryScheduled" in types and types[-1] == "SessionFinished"
    assert w.stats.snapshot().get("clock_waits", 0) >= 1
    check_session(log, sid)


def test_commit_waits_for_every_earlier_delivery() -> None:
    p = _Partition()
    for o in (1, 2, 3):
        assert p.add(o)
    assert not p.add(2)
    assert p.finish(2, "d2") is None and p.finish(3, "d3") is None
    assert p.finish(1, "d1") == "d3" and len(p) == 0


def test_contract_codec_round_trip() -> None:
    g = Goal(goal="add 2 and 2", idempotency_key="k", correlation_id="c", reply_topic="r", progress=True)
    data = encode_goal(g)
    assert decode_goal(data) == g
    assert decode_goal(b"\x00\x00\x00\x00\x07" + data) == g  # Confluent wire format
    with pytest.raises(ContractError):
        decode_goal(b"\x00")
    with pytest.raises(ContractError):
        encode_goal(Goal(goal="  "))
    u = SessionUpdate(correlation_id="c", session_id="s", kind="result", status="done", seq=9,
                      event_type="SessionFinished", time=1, answer="4")
    assert decode_update(encode_update(u)) == u


def test_kafka_url() -> None:
    k = parse_kafka_url("kafka://h:9092?prefix=t1&session.timeout.ms=2000")
    assert (k.bootstrap, k.events_topic, k.goals_topic, k.results_topic) == ("h:9092", "t1.events", "t1.goals", "t1.results")
    assert k.consumer_config == {"session.timeout.ms": "2000"} and k.group("model") == "t1.model"
    assert parse_kafka_url("kafka://h:1/").events_topic == "loopstream.events"
    with pytest.raises(ContractError):
        parse_kafka_url("kafka://h:1?bogus=1")


def test_a_handler_bug_is_retried_then_its_session_fails_saying_why(tmp_path: Path) -> None:
    log = SQLiteLog(tmp_path / "l.db")
    rt = SessionWriter(log)
    bad, good = rt.start("bad", CONFIG), rt.start("good", CONFIG)

    class Buggy:
        name, acts_for, triggers = "buggy", "orchestrator", frozenset({"GoalReceived"})

        def handle(self, event, state, now_ms):
            if state.goal == "bad":
                raise RuntimeError("bug")
            return []

    procs = [Buggy(), *processors_for("all", provider=ScriptedProvider(adder_script(1)))]
    w = Worker(log, procs, "t.bug", retry_delays=(0.01,), max_attempts=3)
    run_workers([w], lambda: fold(log.read(good)).terminal and w.stats.snapshot().get("abandoned") == 1)
    stats = w.stats.snapshot()
    assert stats["handler_errors"] == 3 and stats["abandoned"] == 1
    state = fold(log.read(bad))  # the buggy delivery was skipped; the session ends, saying why
    assert state.status == "failed", state.status
    assert "handling GoalReceived seq 1 failed 3 times: RuntimeError: bug" in state.error, state.error
    assert log.read(bad)[-1].payload.error_kind == "internal"
    assert w.stats.snapshot()["sessions_failed"] == 1
    check_session(log, good)


def test_a_stop_signal_while_the_role_starts_stops_it_cleanly(tmp_path: Path, monkeypatch) -> None:
    """SIGTERM while the role is still opening (loading a model, connecting) is not lost and
    does not kill the process: the worker starts, stops at once and returns."""
    import os
    import signal
    from contextlib import contextmanager

    from loopstream.kafka import roles

    real_open_role = roles.open_role

    @contextmanager
    def open_role_then_signal(opts):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the role is opening
        with real_open_role(opts) as opened:
            yield opened

    monkeypatch.setattr(roles, "open_role", open_role_then_signal)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        opts = roles.WorkerOptions(role="all", db=tmp_path / "l.db", provider="scripted", model="adder:1")
        started = time.monotonic()
        worker = roles.run_role(opts)
        assert worker.stopping and time.monotonic() - started < 30
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
