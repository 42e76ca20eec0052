"""The dispatch rule and the processor contract: a processor is called only for what the
fold says is owed (a redelivered, answered event calls nothing), and a processor is a
pure function of (event, state, now): no wall clock, no decision kept in memory."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from loopstream.core import events as ev
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import Owed, clone, fold, open_work
from loopstream.processors.orchestrator import Orchestrator
from loopstream.processors.tools import ToolProcessor
from loopstream.providers.base import ModelReply, ProviderError, ToolCall
from loopstream.providers.scripted import ScriptedProvider, adder_script
from loopstream.runtime.assembly import build_runtime, processors_for
from loopstream.runtime.inline import SessionConfig
from loopstream.runtime.worker import Worker
from loopstream.runtime.writer import SessionWriter
from loopstream.tools import ToolError, default_registry, tool
from tests.test_worker import run_workers

CONFIG = SessionConfig(provider="scripted", model="scripted", tools=["add"])


class Counting:
    """A processor that acts for `actor` on any event type and records what it is called for."""

    triggers = frozenset(ev.PAYLOAD_TYPES)

    def __init__(self, actor: str) -> None:
        self.name = self.acts_for = actor
        self.calls: list[tuple[str, int]] = []

    def handle(self, event: ev.Event, state, now_ms: int) -> list:
        self.calls.append((event.session_id, event.seq))
        return []


def test_a_redelivered_event_that_is_no_longer_owed_calls_no_processor(tmp_path: Path) -> None:
    log = SQLiteLog(tmp_path / "l.db")
    writer = SessionWriter(log)
    done = [writer.start(f"goal {i}", CONFIG) for i in range(3)]
    first = Worker(log, processors_for("all", provider=ScriptedProvider(adder_script(2))), "first")
    run_workers([first], lambda: all(fold(log.read(s)).terminal for s in done))
    waiting = writer.start("not yet handled", CONFIG)  # its GoalReceived is owed to the orchestrator
    # A new group redelivers every event of every session from the start.
    counters = [Counting(a) for a in ("orchestrator", "model", "compaction", "tools")]
    again = Worker(log, counters, "again")
    total = sum(len(log.read(s)) for s in [*done, waiting])
    run_workers([again], lambda: again.stats.snapshot().get("delivered", 0) >= total and again.in_flight() == 0)
    calls = {c.name: c.calls for c in counters}
    assert calls == {"orchestrator": [(waiting, 1)], "model": [], "compaction": [], "tools": []}, calls
    assert again.stats.snapshot()["delivered"] == total


def test_the_inline_driver_dispatches_only_owed_items(tmp_path: Path) -> None:
    """Each recorded step was owed, to its actor, when it was written; a finished session owes nothing."""
    with SQLiteLog(tmp_path / "l.db") as log:
        replies = [ProviderError("busy", retryable=True, status=503),
                   ModelReply(tool_calls=[ToolCall(call_id="a", name="add", arguments={"a": 1, "b": 1}),
                                          ToolCall(call_id="b", name="add", arguments={"a": 2, "b": 2})]),
                   ModelReply(text="2 and 4")]

        def script(messages):
            reply = replies.pop(0)
            if isinstance(reply, Exception):
                raise reply
            return reply

        rt = build_runtime(log, ScriptedProvider(script))
        config = SessionConfig(provider="scripted", model="scripted", tools=["add"], policy={"retries": {"base_ms": 1}})
        final = rt.run_session(rt.start_session("add twice", config))
        assert final.status == "done" and open_work(final) == []
        events = log.read(final.session_id)
        assert {"RetryScheduled", "ToolCompleted"} <= {e.type for e in events}
        firsts = [e for p, e in zip(events, events[1:]) if (p.causation_id, p.actor) != (e.causation_id, e.actor)]
        assert len(firsts) > 8
        assert firsts[0].type == "ModelRequested"
        for e in firsts:  # every batch after the start was written for an owed item
            cause = next(c.seq for c in events if c.event_id == e.causation_id)
            assert Owed(cause, e.actor) in [Owed(o.seq, o.actor) for o in open_work(fold(events[: e.seq]))], e.type


def _tripwire(monkeypatch) -> None:
    """Any read of the wall clock fails the test (latency may still use time.monotonic)."""
    def boom() -> int:
        raise AssertionError("a processor read the wall clock")

    monkeypatch.setattr(ev, "now_ms", boom)
    monkeypatch.setattr(time, "time", boom)


def test_the_orchestrator_is_a_pure_function_of_event_state_and_now(tmp_path: Path, monkeypatch) -> None:
    with SQLiteLog(tmp_path / "l.db") as log:
        provider = ScriptedProvider([ProviderError("busy", retryable=True, status=503), ModelReply(text="ok")])
        rt = build_runtime(log, provider)
        config = SessionConfig(provider="scripted", model="scripted", tools=["add"],
                               policy={"retries": {"base_ms": 100}, "budgets": {"max_wall_seconds": 60}})
        sid = rt.start_session("x", config)
        rt.run_session(sid)
        events = log.read(sid)
    failed = next(e.seq for e in events if e.type == "ModelFailed")
    state = fold(events[: failed + 1])  # planning after a failed model call: a backoff is due
    head, before, t0 = events[failed], clone(state), state.started_ms
    orch = Orchestrator()
    _tripwire(monkeypatch)
    (retry,) = [e.payload for e in orch.handle(head, state, t0 + 1_000)]
    assert retry.not_before_ms == t0 + 1_000 + retry.delay_ms  # counted from the `now` given
    assert orch.handle(head, state, t0 + 1_000) == Orchestrator().handle(head, state, t0 + 1_000)  # same in, same out
    (later,) = [e.payload for e in orch.handle(head, state, t0 + 5_000)]
    assert later.model_copy(update={"not_before_ms": 0}) == retry.model_copy(update={"not_before_ms": 0})
    assert later.not_before_ms - retry.not_before_ms == 4_000
    (stop,) = [e.payload for e in orch.handle(head, state, t0 + 61_000)]  # the wall-time budget, by `now`
    assert stop.TYPE == "SessionFailed" and stop.error_kind == "budget_time"
    assert state == before  # the state is not touched


def test_the_tool_processor_decides_from_the_log_not_from_memory(tmp_path: Path, monkeypatch) -> None:
    """A non-idempotent side-effect tool killed between its checkpoint and its run: the very
    processor that took the checkpoint reports outcome_unknown, as a new one does, because
    the owed checkpoint in the log says the run may have started."""
    work = tmp_path / "work"
    work.mkdir()

    class Crash(Exception):
        pass

    def crash(event) -> None:
        if event.type == "WorkspaceCheckpointed":
            raise Crash

    provider = ScriptedProvider([ModelReply(tool_calls=[ToolCall(call_id="1", name="shell",
                                                                  arguments={"command": "echo ran >> ran.txt"})])])
    with SQLiteLog(tmp_path / "l.db") as log:
        rt = build_runtime(log, provider, default_registry(allow_writes=True), on_event=crash)
        sid = rt.start_session("run it", SessionConfig(provider="scripted", model="s", tools=["shell"],
                                                        workdir=str(work)))
        with pytest.raises(Crash):
            rt.run_session(sid)
        events = log.read(sid)
    state = fold(events)
    (owed,) = open_work(state)
    checkpoint = events[owed.seq]
    assert checkpoint.type == "WorkspaceCheckpointed" and not (work / "ran.txt").exists()
    same = next(p for p in rt.processors if isinstance(p, ToolProcessor))
    fresh = ToolProcessor(default_registry(allow_writes=True))
    answers = [p.handle(checkpoint, state, 1) for p in (same, fresh)]
    assert answers[0] == answers[1]
    (failed,) = [e.payload for e in answers[0]]
    assert failed.error_kind == "outcome_unknown" and not (work / "ran.txt").exists()
    # Its first step only announces the run: the checkpoint, with the run attached for after it is in the log.
    requested = next(e for e in events if e.type == "ToolRequested")
    (announce,) = fresh.handle(requested, fold(events[: requested.seq + 1]), 1)
    assert announce.payload.TYPE == "WorkspaceCheckpointed" and announce.then is not None
    assert not (work / "ran.txt").exists()


def test_a_tool_retry_is_scheduled_from_the_now_it_is_given(tmp_path: Path, monkeypatch) -> None:
    @tool
    def busy(x: int) -> str:
        """Always busy."""
        raise ToolError("upstream busy", kind="transient")

    registry = default_registry().add(busy)
    provider = ScriptedProvider([ModelReply(tool_calls=[ToolCall(call_id="1", name="busy", arguments={"x": 1})]),
                                 ModelReply(text="gave up")])
    with SQLiteLog(tmp_path / "l.db") as log:
        rt = build_runtime(log, provider, registry)
        sid = rt.start_session("x", SessionConfig(provider="scripted", model="s", tools=["busy"],
                                                  policy={"retries": {"base_ms": 1, "max_tool_attempts": 2}}))
        assert rt.run_session(sid).status == "done"
        events = log.read(sid)
    requested = next(e for e in events if e.type == "ToolRequested")
    state = fold(events[: requested.seq + 1])
    _tripwire(monkeypatch)
    (a,) = ToolProcessor(registry).handle(requested, state, 10_000)
    (b,) = ToolProcessor(registry).handle(requested, state, 10_000)
    assert a == b and a.payload.TYPE == "RetryScheduled" and a.payload.not_before_ms == 10_000 + a.payload.delay_ms
    recorded = next(e.payload for e in events if e.type == "RetryScheduled")
    assert recorded.model_copy(update={"not_before_ms": 0}) == a.payload.model_copy(update={"not_before_ms": 0})
