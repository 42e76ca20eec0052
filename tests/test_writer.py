"""The session writer's one conflict policy, with writers racing on one real SQLite file:
the same fact twice is written once (DuplicateEvent), emits still owed after another
writer moved the session are appended after the new head, emits no longer owed are
dropped, and a person's decision is checked again at the new head."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from loopstream.core import events as ev
from loopstream.core.fsm import IllegalTransition
from loopstream.core.log import Log
from loopstream.core.processor import Emit
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import Owed, PendingCall, SessionState, fold, open_work
from loopstream.providers.base import ToolCall
from loopstream.runtime.writer import SessionConfig, SessionWriter

CONFIG = SessionConfig(provider="scripted", model="m", tools=["add"])


def head(log: Log, state: SessionState) -> ev.Event:
    (event,) = log.read(state.session_id, state.seq, state.seq)
    return event


def emit_owed(writer: SessionWriter, state: SessionState, actor: str, *payloads: ev.Payload, key: str = ""):
    """Write `payloads` for the first item of `state` owed to `actor`."""
    item = next(o for o in open_work(state) if o.actor == actor)
    (cause,) = writer.log.read(state.session_id, item.seq, item.seq)
    return writer.emit(state, item, cause, [Emit(p, key=key or p.TYPE) for p in payloads], actor)


def awaiting_tools(writer: SessionWriter, calls: int) -> SessionState:
    """A session whose model asked for `calls` add calls, all requested, none answered."""
    state = writer.load(writer.start("add", CONFIG))
    state = emit_owed(writer, state, "orchestrator", ev.ModelRequested(request_id="r1", step=1, attempt=1,
                                                                       model="m")).state
    records = [ev.ToolCallRecord(call_id=f"c{i}", name="add", arguments_json=f'{{"a": {i}, "b": 1}}')
               for i in range(calls)]
    state = emit_owed(writer, state, "model", ev.ModelResponded(
        request_id="r1", text="", tool_calls=records, input_tokens=1, output_tokens=1, latency_ms=1,
        finish_reason="tool_calls", mode="native", model="m")).state
    requests = [Emit(ev.ToolRequested(call_id=r.call_id, name=r.name, arguments_json=r.arguments_json, step=1),
                     key=r.call_id) for r in records]
    item = open_work(state)[0]
    return writer.emit(state, item, head(writer.log, state), requests, "orchestrator").state


def result(call_id: str, text: str = "1") -> ev.ToolCompleted:
    return ev.ToolCompleted(call_id=call_id, name="add", result=text, latency_ms=1)


def race(n: int, work) -> list:
    """Run work(i) in n threads released at once; their results (or exceptions)."""
    barrier = threading.Barrier(n)
    out: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = work(i)
        except Exception as exc:  # returned, so the test can look at it
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_writers_racing_on_the_same_fact_write_it_once(tmp_path: Path) -> None:
    db = tmp_path / "race.db"
    with SQLiteLog(db) as log:
        state = awaiting_tools(SessionWriter(log), calls=1)
    logs = [SQLiteLog(db) for _ in range(4)]  # one connection each: separate writers on one file
    try:
        outcomes = race(4, lambda i: emit_owed(SessionWriter(logs[i]), state, "tools", result("c0")).outcome)
        assert sorted(outcomes) == ["appended", "duplicate", "duplicate", "duplicate"], outcomes
        events = logs[0].read(state.session_id)
        assert [e.type for e in events].count("ToolCompleted") == 1
        assert fold(events).status == "planning"
    finally:
        for log in logs:
            log.close()


def test_writers_racing_on_different_owed_calls_all_land_after_each_other(tmp_path: Path) -> None:
    """Every writer starts from the same (soon stale) head; each call is still owed after the
    others' results, so each is appended after the new head, once, with the ids it built."""
    db = tmp_path / "race.db"
    with SQLiteLog(db) as log:
        state = awaiting_tools(SessionWriter(log), calls=4)
    logs = [SQLiteLog(db) for _ in range(4)]
    try:
        def answer(i: int):
            item = next(o for o in open_work(state) if o.seq == state.pending_calls[f"c{i}"].owed_seq)
            (cause,) = logs[i].read(state.session_id, item.seq, item.seq)
            return SessionWriter(logs[i]).emit(state, item, cause, [Emit(result(f"c{i}", str(i + 1)))], "tools")

        written = race(4, answer)
        assert all(w.appended for w in written), written
        assert sum(w.conflicts for w in written) >= 3  # all but the first met a moved head at least once
        events = logs[0].read(state.session_id)
        done = [e for e in events if e.type == "ToolCompleted"]
        assert sorted(e.payload.call_id for e in done) == ["c0", "c1", "c2", "c3"]
        assert [e.seq for e in events] == list(range(len(events)))
        final = fold(events)
        assert final.status == "planning" and not final.pending_calls
        assert {w.events[0].event_id for w in written} == {e.event_id for e in done}
    finally:
        for log in logs:
            log.close()


def test_emits_no_longer_owed_after_a_conflict_are_dropped(tmp_path: Path) -> None:
    with SQLiteLog(tmp_path / "l.db") as log:
        writer = SessionWriter(log)
        state = awaiting_tools(writer, calls=1)
        first = emit_owed(writer, state, "tools", result("c0"))
        # A second writer still holding the old head: its different fact for the same call
        # conflicts, and after the refresh the call is not owed any more.
        late = emit_owed(SessionWriter(log), state, "tools",
                         ev.ToolFailed(call_id="c0", name="add", error_kind="timeout", message="late", latency_ms=9))
        assert first.appended and (late.outcome, late.conflicts, late.events) == ("dropped", 1, [])
        assert late.state.seq == first.state.seq
        assert [e.type for e in log.read(state.session_id)].count("ToolFailed") == 0


def test_a_decision_is_checked_again_at_the_new_head(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    with SQLiteLog(db) as log:
        sid = SessionWriter(log).start("g", CONFIG)
    a, b = SQLiteLog(db), SQLiteLog(db)
    try:
        outcomes = race(2, lambda i: SessionWriter((a, b)[i]).record(
            sid, [ev.SessionCancelled(reason=f"person {i}")], actor=f"person:{i}"))
        # Whoever came second found a cancelled session: cancelling it again does not apply there.
        assert sorted(w.outcome for w in outcomes) == ["appended", "dropped"], outcomes
        assert all(w.state.status == "cancelled" for w in outcomes)
        assert [e.type for e in a.read(sid)].count("SessionCancelled") == 1
        # Recorded again later, at the new head, it is illegal there: refused, nothing stored.
        with pytest.raises(IllegalTransition):
            SessionWriter(b).record(sid, [ev.SessionCancelled(reason="again")], actor="person:1")
        # Decisions that still apply after the head moved land after it, each once.
        other = SessionWriter(a).start("g2", CONFIG)
        said = race(2, lambda i: SessionWriter((a, b)[i]).record(other, [ev.UserMessage(text=f"m{i}")], f"p{i}"))
        assert all(w.appended for w in said), said
        users = [m.content for m in SessionWriter(a).load(other).messages if m.role == "user"]
        assert users[0] == "g2" and sorted(users[1:]) == ["m0", "m1"]
    finally:
        a.close()
        b.close()


def test_a_repeated_start_from_two_writers_starts_one_session(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    logs = [SQLiteLog(db) for _ in range(3)]
    try:
        sids = race(3, lambda i: SessionWriter(logs[i]).start("g", CONFIG, idempotency_key="order-9"))
        assert len(set(sids)) == 1 and len(logs[0].read(sids[0])) == 2 and len(logs[0].sessions()) == 1
    finally:
        for log in logs:
            log.close()


def test_nothing_illegal_is_stored_and_secrets_are_redacted(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SERVICE_API_KEY", "sk-very-secret-value")
    with SQLiteLog(tmp_path / "l.db") as log:
        writer = SessionWriter(log, clock=lambda: 1234)
        sid = writer.start("use sk-very-secret-value please", CONFIG)
        with pytest.raises(IllegalTransition):
            writer.record(sid, [ev.SessionFinished(answer="x", steps=0, input_tokens=0, output_tokens=0)], "p")
        events = log.read(sid)
        assert [e.type for e in events] == ["SessionStarted", "GoalReceived"]
        assert events[1].payload.text == "use [REDACTED:SERVICE_API_KEY] please"
        assert {e.time for e in events} == {1234}  # the writer's clock, passed in
        # Chained: each event links to the one before.
        assert events[0].chain_hash and events[1].chain_hash and events[0].chain_hash != events[1].chain_hash


def test_owed_items_say_who_owes_them() -> None:
    """open_work per call: a call waiting for a person is owed by the person, the others by the tools."""
    state = SessionState(session_id="s", status="awaiting_approval", seq=9)
    state.pending_calls = {
        "a": PendingCall(ToolCall(call_id="a", name="add"), owed_seq=7, approval="rule: ask"),
        "b": PendingCall(ToolCall(call_id="b", name="add"), owed_seq=5, retry_at_ms=99),
        "c": PendingCall(ToolCall(call_id="c", name="write_file"), owed_seq=8, checkpoint_seq=8),
    }
    assert open_work(state) == [Owed(8, "tools"), Owed(5, "tools", 99), Owed(7, "person")]
    assert state.open_approvals == {"a": "rule: ask"}
