"""Replay, the hash chain, fork, diff and the determinism check, over a real SQLite log."""
from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from loopstream.core import events as ev
from loopstream.core.codec import REGISTRY, decode, encode, seal
from loopstream.core.processor import Emit
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from loopstream.processors.model import ModelProcessor
from loopstream.processors.orchestrator import Orchestrator
from loopstream.processors.tools import ToolProcessor
from loopstream.providers.base import (
    Message,
    ModelReply,
    ProviderError,
    ToolCall,
    ToolSpec,
)
from loopstream.providers.scripted import ScriptedProvider, adder_script, scripted_from_spec
from loopstream.replay import (
    ForkError,
    ForkNeedsAcknowledgement,
    check_determinism,
    diff,
    export_session,
    fork,
    read_archive,
    render,
    render_diff,
    replay,
    replay_raw,
    verify,
)
from loopstream.replay.inspect import answered_by, session_rows
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import Runtime, SessionConfig
from loopstream.runtime.writer import build_events
from loopstream.tools import ToolRegistry, default_registry, tool

STEPS_1000 = 249  # 2 + 4 * 249 + 3 = 1,001 events


def config(**kw) -> SessionConfig:
    kw.setdefault("tools", ["add"])
    kw.setdefault("system_prompt", "Be brief.")
    kw.setdefault("max_steps", 300)
    return SessionConfig(provider="scripted", model="scripted:adder", **kw)


def run(log, provider, goal="count", registry=None, **kw) -> str:
    # Side-effect tools checkpoint their workdir: keep it beside the test's log, never the repo.
    path = getattr(log, "path", None)
    kw.setdefault("workdir", str(Path(path).parent) if path else tempfile.mkdtemp(prefix="ls-replay-"))
    rt = build_runtime(log, provider, registry)
    sid = rt.start_session(goal, config(**kw))
    rt.run_session(sid)
    return sid


def visible(messages: list[Message]) -> list[dict]:
    """What a provider sends of each message (not `seq`, the log position it came from)."""
    return [m.model_dump(exclude={"seq"}) for m in messages]


class Recording:
    """A provider that remembers what each call was given (the context the model saw)."""

    def __init__(self, inner, model: str = "scripted") -> None:
        self.inner, self.model, self.name = inner, model, "scripted"
        self.seen: list[tuple[list[Message], list[str]]] = []

    def complete(self, messages: list[Message], tools: list[ToolSpec], sampling=None, *, timeout=None) -> ModelReply:
        self.seen.append((list(messages), [t.name for t in tools]))
        return self.inner.complete(messages, tools, sampling)


@pytest.fixture
def log(tmp_path):
    with SQLiteLog(tmp_path / "replay.db") as log:
        yield log


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """One 1,001-event session, built once (read-only for the tests that use it)."""
    with SQLiteLog(tmp_path_factory.mktemp("big") / "big.db") as log:
        sid = run(log, ScriptedProvider(adder_script(STEPS_1000)))
        yield log, sid


def tamper(log: SQLiteLog, sid: str, seq: int, data: bytes) -> None:
    log.db.conn.execute("UPDATE events SET data = ? WHERE session_id = ? AND seq = ?", (data, sid, seq))


def copy_session(log, sid: str, into, change=None) -> None:
    """Session `sid` of `log` written again into the log `into` (same ids), optionally
    doctored (change(event) -> event) and properly chained, so only the content differs:
    what a bug or another version of the code would have written."""
    out = [e.model_copy(update={"chain_hash": None}) for e in log.read(sid)]
    into.append(sid, seal([change(e) for e in out] if change else out, None), 0)


# -- the chain ---------------------------------------------------------------------------


def test_every_event_is_chained_by_the_documented_formula(log) -> None:
    sid = run(log, ScriptedProvider(adder_script(2)))
    raw = log.read_raw(sid)
    h = b"loopstream-chain-v1"
    for data in raw:
        assert data[-33] == 2  # union branch 1: a hash follows
        h = hashlib.sha256(h + data[:-33]).digest()
        assert data[-32:] == h == decode(data).chain_hash
    report = verify(log, sid)
    assert report.status == "ok" and report.ok and report.checked == len(raw) and report.head == h.hex()


def test_chain_field_is_plain_avro_of_the_envelope_schema(log) -> None:
    """Other Avro readers (Kafka consumers in any language) read chain_hash as a field."""
    from io import BytesIO

    from fastavro import schemaless_reader

    sid = run(log, ScriptedProvider(adder_script(1)))
    for data in log.read_raw(sid):
        record = schemaless_reader(BytesIO(data), REGISTRY.envelope)
        assert record["chain_hash"] == data[-32:]
        assert encode(decode(data)) == data


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_changing_one_stored_event_names_its_seq(big, tmp_path, where) -> None:
    src_log, src = big
    with SQLiteLog(tmp_path / "t.db") as log:
        copy_session(src_log, src, log)  # tamper with a copy: `big` stays intact
        n = log.next_seq(src)
        seq = {"first": 0, "middle": 501, "last": n - 1}[where]
        event = decode(log.read_raw(src, seq, seq)[0])
        assert where != "middle" or event.type == "ToolCompleted"
        if isinstance(event.payload, ev.ToolCompleted):  # a believable edit: another tool result
            forged = event.model_copy(update={"payload": event.payload.model_copy(update={"result": "999"})})
        else:
            forged = event.model_copy(update={"time": event.time + 1})
        tamper(log, src, seq, encode(forged))  # the old chain_hash stays: the edit must show
        report = verify(log, src)
        assert not report.ok and report.first_bad_seq == seq
        replayed = replay(log, src)
        assert not replayed.ok and replayed.first_bad_seq == seq
        assert replayed.state.seq == seq - 1  # only what the chain vouches for is folded
        assert f"BROKEN at seq {seq}" in render(replayed)
        assert replay(log, src, to_seq=seq - 1).ok if seq else True


def test_flipping_any_byte_names_the_seq(log) -> None:
    sid = run(log, ScriptedProvider(adder_script(2)))
    raw = log.read_raw(sid)
    for seq in (1, 4, len(raw) - 1):
        data = bytearray(raw[seq])
        for pos in (5, len(data) // 2, len(data) - 40, len(data) - 1):
            data2 = bytearray(data)
            data2[pos] ^= 0x01
            tamper(log, sid, seq, bytes(data2))
            assert verify(log, sid).first_bad_seq == seq, (seq, pos)
        tamper(log, sid, seq, raw[seq])
    assert verify(log, sid).ok


def test_removed_stripped_or_reordered_events_are_caught(log) -> None:
    sid = run(log, ScriptedProvider(adder_script(2)))
    raw = log.read_raw(sid)
    n = len(raw)
    # a stripped hash
    tamper(log, sid, 3, raw[3][:-33] + b"\x00")
    assert verify(log, sid).first_bad_seq == 3
    tamper(log, sid, 3, raw[3])
    # two events swapped
    tamper(log, sid, 4, raw[5])
    tamper(log, sid, 5, raw[4])
    assert verify(log, sid).first_bad_seq == 4
    tamper(log, sid, 4, raw[4])
    tamper(log, sid, 5, raw[5])
    # the last event cut off: the chain cannot see it, the log's next seq does
    log.db.conn.execute("DELETE FROM events WHERE session_id = ? AND seq = ?", (sid, n - 1))
    report = verify(log, sid)
    assert not report.ok and report.first_bad_seq == n - 1 and "only" in report.reason


# -- replay --------------------------------------------------------------------------------


def test_replay_of_1000_events_calls_no_model_no_tool_no_network_no_subprocess(big, monkeypatch) -> None:
    log, sid = big

    def forbidden(*a, **k):
        raise AssertionError("replay must not call out")

    monkeypatch.setattr(socket.socket, "connect", forbidden)
    monkeypatch.setattr(socket.socket, "connect_ex", forbidden)
    monkeypatch.setattr(socket, "create_connection", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    monkeypatch.setattr(ScriptedProvider, "complete", forbidden)
    monkeypatch.setattr(ToolRegistry, "call", forbidden)
    from loopstream.tools.registry import Tool

    monkeypatch.setattr(Tool, "invoke", forbidden)
    report = replay(log, sid)
    assert report.ok and report.chain.status == "ok" and report.chain.checked == 1001
    assert report.model_calls_made == 0 and report.tool_calls_made == 0
    assert report.state == fold(log.read(sid))
    assert report.state.status == "done" and report.state.answer == f"The result is {STEPS_1000}."
    t = report.totals
    assert (t.events, t.steps, t.model_calls, t.tool_calls) == (1001, STEPS_1000 + 1, STEPS_1000 + 1, STEPS_1000)
    assert check_determinism(log, sid).ok  # the decisions, too, are re-made without calling anything
    assert diff(log, sid, sid).identical


def test_replay_to_seq_stops_there(big) -> None:
    log, sid = big
    for to in (0, 1, 2, 3, 500, 999):
        report = replay(log, sid, to_seq=to)
        assert report.ok and report.state == fold(log.read(sid, 0, to))
        assert report.chain.checked == to + 1 and report.state.seq == to
        assert max(i.seq for i in report.timeline) <= to
    text = render(replay(log, sid, to_seq=500))
    assert "stopped at --to 500" in text and "seq 0..500 (501 events)" in text
    assert text.splitlines()[-1].startswith("status: awaiting_tools")


def test_report_shows_model_calls_tool_calls_errors_and_totals(log) -> None:
    calls = {"n": 0}

    def script(messages):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ProviderError("429 slow down", retryable=True, status=429, kind="rate_limit")
        if not any(m.role == "tool" for m in messages):
            return ModelReply(tool_calls=[ToolCall(call_id="a", name="add", arguments={"a": 2, "b": 3}),
                                          ToolCall(call_id="b", name="add", arguments={"a": "x"})],
                              input_tokens=20, output_tokens=8, mode="json_schema")
        return ModelReply(text="5", input_tokens=30, output_tokens=2)

    sid = run(log, ScriptedProvider(script), policy={"retries": {"base_ms": 1, "max_ms": 2}})
    report = replay(log, sid)
    models = [i for i in report.timeline if type(i).__name__ == "ModelCall"]
    tools = [i for i in report.timeline if type(i).__name__ == "ToolCallView"]
    assert [m.ok for m in models] == [False, True, True]
    assert models[0].error_kind == "rate_limit" and models[0].retryable
    assert models[1].mode == "json_schema" and models[1].tool_calls == ["add(a=2, b=3)", "add(a='x')"]
    assert (models[1].input_tokens, models[1].output_tokens) == (20, 8)
    assert [(t.name, t.ok, t.result) for t in tools] == [("add", True, "5"), ("add", False, "")]
    assert tools[1].error_kind == "invalid_arguments"
    assert [e.type for e in report.errors] == ["ModelFailed", "ToolFailed"]
    t = report.totals
    assert (t.steps, t.model_calls, t.model_failures, t.tool_calls, t.tool_errors) == (2, 3, 1, 2, 1)
    assert (t.input_tokens, t.output_tokens) == (50, 10)
    text = render(report)
    for needle in ("FAILED rate_limit: 429 slow down", "add(a=2, b=3) → '5'", "FAILED invalid_arguments",
                   "retry", "errors (2):", "status: done · answer '5'", "0 model calls and 0 tool calls"):
        assert needle in text, needle


def test_replay_from_an_exported_file_equals_replay_from_the_log(log, tmp_path) -> None:
    sid = run(log, ScriptedProvider(adder_script(3)))
    assert export_session(log, sid, tmp_path / "s.avro") == 17
    raw = read_archive(tmp_path / "s.avro")
    assert raw == log.read_raw(sid)
    a, b = replay(log, sid), replay_raw(raw, sid)
    assert a.state == b.state and a.chain == b.chain and render(a) == render(b)


# -- fork ------------------------------------------------------------------------------------


def test_fork_at_500_continues_with_exactly_the_parents_context(big, tmp_path) -> None:
    src_log, parent = big
    with SQLiteLog(tmp_path / "f.db") as log:
        log.append(parent, [decode(b) for b in src_log.read_raw(parent)], 0)  # same bytes, own file
        assert log.read_raw(parent) == src_log.read_raw(parent)
        parent_events = log.read(parent)
        assert parent_events[500].type == "ToolRequested"  # mid-step: the tool call is owed

        t = time.perf_counter()
        result = fork(log, parent, 500, reason="test")
        print(f"\nfork at 500 of 1,001 events: {(time.perf_counter() - t) * 1000:.1f} ms")
        child = result.child_session_id
        assert result.events_referred == 501 and result.state.status == "awaiting_tools"
        assert result.events_copied == result.bytes_copied == 0

        # The child's log: the parent's events 0..500 (the same bytes), then the provenance marker.
        child_events = log.read(child)
        assert log.read_raw(child, 0, 500) == log.read_raw(parent, 0, 500)
        assert child_events[:501] == parent_events[:501]
        assert {e.session_id for e in child_events[501:]} == {child}
        marker = child_events[501].payload
        assert isinstance(marker, ev.SessionForked)
        assert (marker.parent_session_id, marker.parent_seq) == (parent, 500)
        assert marker.parent_event_hash == parent_events[500].chain_hash.hex()
        # Storage stays linear: the child refers to the prefix; it stores only its own events.
        (own,) = log.db.conn.execute("SELECT count(*) FROM events WHERE session_id = ?", (child,)).fetchone()
        assert own == 1 and log.parent_of(child) == (parent, 500)

        recorder = Recording(ScriptedProvider(adder_script(STEPS_1000)))
        state = build_runtime(log, recorder).run_session(child)
        assert state.status == "done" and state.answer == f"The result is {STEPS_1000}."
        first_messages, _ = recorder.seen[0]
        # The parent's context up to 500, plus the result of the tool call owed at 500
        # (redone by the child), is exactly what the parent's next model call saw.
        at_500 = fold(parent_events[:501]).messages
        assert first_messages[: len(at_500)] == at_500  # identical, seqs included
        assert visible(first_messages) == visible(fold(parent_events[:503]).messages)
        assert verify(log, child).ok and check_determinism(log, child).ok


def test_fork_at_a_planning_head_sees_exactly_the_parent_context(log) -> None:
    parent = run(log, ScriptedProvider(adder_script(3)))
    events = log.read(parent)
    at = 9  # ToolCompleted of step 2: planning
    recorder = Recording(ScriptedProvider(adder_script(3)))
    result = fork(log, parent, at)
    build_runtime(log, recorder).run_session(result.child_session_id)
    assert recorder.seen[0][0] == fold(events[: at + 1]).messages
    assert diff(log, parent, result.child_session_id).identical


def test_overrides_take_effect_from_the_childs_next_step(log) -> None:
    @tool
    def double(x: float) -> str:
        """Double a number."""
        return str(2 * x)

    registry = default_registry().add(double)
    parent = run(log, ScriptedProvider(adder_script(3)), registry=registry)
    result = fork(log, parent, 9, model="other-model", provider="scripted", system_prompt="Be terse.",
                  tools=["add", "double"], max_steps=7, registry=registry, reason="compare")
    assert (result.state.model, result.state.tools, result.state.max_steps) == ("other-model", ["add", "double"], 7)
    recorder = Recording(ScriptedProvider(adder_script(3)), model="other-model")
    build_runtime(log, recorder, registry).run_session(result.child_session_id)
    messages, tool_names = recorder.seen[0]
    assert messages[0] == Message(role="system", content="Be terse.", seq=0)
    assert messages[1:] == fold(log.read(parent, 0, 9)).messages[1:]
    assert tool_names == ["add", "double"]
    requested = [e.payload for e in log.read(result.child_session_id) if e.type == "ModelRequested"]
    assert [r.model for r in requested] == ["scripted:adder"] * 2 + ["other-model"] * 2
    marker = next(e.payload for e in log.read(result.child_session_id) if e.type == "SessionForked")
    assert json.loads(marker.overrides_json) == {
        "model": "other-model", "provider": "scripted", "system_prompt": "Be terse.", "tools": ["add", "double"],
        "max_steps": 7}
    assert marker.reason == "compare"
    with pytest.raises(ForkError, match="unknown tool"):
        fork(log, parent, 9, tools=["nope"], registry=registry)


def test_fork_with_a_message(log) -> None:
    parent = run(log, ScriptedProvider(adder_script(2)))
    events = log.read(parent)
    last = len(events) - 1  # SessionFinished
    with pytest.raises(ForkError, match=f"fork at {last - 1}"):
        fork(log, parent, last, message="more")
    # At the final reply (acting, no tool calls): say something new.
    result = fork(log, parent, last - 1, message="Now add one more.")
    child = log.read(result.child_session_id)
    assert [e.type for e in child[-2:]] == ["SessionForked", "UserMessage"] and result.state.status == "planning"
    recorder = Recording(ScriptedProvider(adder_script(3)))
    build_runtime(log, recorder).run_session(result.child_session_id)
    assert visible(recorder.seen[0][0][-1:]) == visible([Message(role="user", content="Now add one more.")])
    assert recorder.seen[0][0][:-1] == fold(events[:last]).messages
    # Where the model or a tool owes an answer, a message is refused with a hint.
    with pytest.raises(ForkError, match=r"awaiting_model.*nearest earlier seq where it is: 1\b"):
        fork(log, parent, 2, message="hi")
    with pytest.raises(ForkError, match="cannot fork at 99"):
        fork(log, parent, 99)


def test_side_effects_after_the_fork_point_need_acknowledgement(log) -> None:
    sent = []

    @tool(read_only=False, idempotent=False)
    def send_email(to: str, body: str) -> str:
        """Send an email."""
        sent.append(to)
        return "sent"

    registry = default_registry().add(send_email)

    def script(messages):
        n = sum(1 for m in messages if m.role == "tool")
        if n == 0:
            return ModelReply(tool_calls=[ToolCall(call_id="a", name="add", arguments={"a": 1, "b": 1})])
        if n == 1:
            return ModelReply(tool_calls=[ToolCall(call_id="m", name="send_email", arguments={"to": "x@y", "body": "2"})])
        return ModelReply(text="done")

    parent = run(log, ScriptedProvider(script), registry=registry, tools=["add", "send_email"])
    assert sent == ["x@y"]
    email_done = next(e.seq for e in log.read(parent) if e.type == "ToolCompleted" and e.payload.name == "send_email")
    with pytest.raises(ForkNeedsAcknowledgement) as info:
        fork(log, parent, 5, registry=registry)
    (effect,) = info.value.side_effects
    assert (effect.seq, effect.name, effect.outcome) == (email_done, "send_email", "completed")
    assert "send_email" in str(info.value) and f"seq {email_done}" in str(info.value)
    # After the email ran, forking repeats nothing: no acknowledgement needed.
    fork(log, parent, email_done, registry=registry)
    # Unknown tools count as side-effecting (the default registry does not know send_email).
    with pytest.raises(ForkNeedsAcknowledgement, match="unknown tool"):
        fork(log, parent, 5)
    result = fork(log, parent, 5, registry=registry, acknowledge_side_effects=True, reason="redo the mail")
    marker = next(e.payload for e in log.read(result.child_session_id) if e.type == "SessionForked")
    acked = json.loads(marker.acknowledged_side_effects_json)
    assert [(a["name"], a["seq"], a["outcome"]) for a in acked] == [("send_email", email_done, "completed")]
    build_runtime(log, ScriptedProvider(script), registry).run_session(result.child_session_id)
    assert sent == ["x@y", "x@y"]  # as acknowledged: the child ran it again


def test_fork_refuses_a_broken_parent(log) -> None:
    parent = run(log, ScriptedProvider(adder_script(2)))
    data = bytearray(log.read_raw(parent, 3, 3)[0])
    data[10] ^= 1
    tamper(log, parent, 3, bytes(data))
    with pytest.raises(ForkError, match="broken chain"):
        fork(log, parent, 5)
    fork(log, parent, 2)  # before the damage is fine


def test_fork_of_a_fork_and_its_determinism(log) -> None:
    parent = run(log, ScriptedProvider(adder_script(3)))
    a = fork(log, parent, 9, model="m2", message="again")
    build_runtime(log, ScriptedProvider(adder_script(4))).run_session(a.child_session_id)
    b = fork(log, a.child_session_id, 17, reason="second")
    build_runtime(log, ScriptedProvider(adder_script(4))).run_session(b.child_session_id)
    for sid in (parent, a.child_session_id, b.child_session_id):
        report = check_determinism(log, sid)
        assert report.ok and report.decisions_checked > 0, report.render()
    assert "b is a fork of a at seq 17" in render_diff(diff(log, a.child_session_id, b.child_session_id))


# -- diff -------------------------------------------------------------------------------------


def test_diff_parent_and_fork_with_another_model(log) -> None:
    parent = run(log, ScriptedProvider(adder_script(3)))
    result = fork(log, parent, 9, model="other", reason="try other")
    build_runtime(log, ScriptedProvider(adder_script(5), model="other")).run_session(result.child_session_id)
    report = diff(log, parent, result.child_session_id)
    assert report.relation == "b is a fork of a at seq 9"
    d = report.divergence
    assert d is not None and report.common_events == 10
    assert (d.seq_a, d.seq_b, d.fields) == (10, 11, ["model"])  # b's seq 10 is the fork marker
    assert (report.a.answer, report.b.answer) == ("The result is 3.", "The result is 5.")
    assert (report.a.steps, report.b.steps) == (4, 6)
    assert len(report.a.tool_calls) == 3 and len(report.b.tool_calls) == 5
    assert report.b.input_tokens > report.a.input_tokens
    text = render_diff(report)
    for needle in ("first divergence after 10 agreeing events: a seq 10 vs b seq 11 (fields: model)",
                   "≠ answer", "'The result is 5.'", "tool calls only in b: add(a=3, b=1); add(a=4, b=1)"):
        assert needle in text, needle


def test_diff_of_two_independent_identical_runs_ignores_ids_times_and_latency(log) -> None:
    a = run(log, ScriptedProvider(adder_script(2)))
    b = run(log, ScriptedProvider(adder_script(2)))
    report = diff(log, a, b)
    assert report.identical and report.common_events == 13 and report.relation == ""
    c = run(log, ScriptedProvider(adder_script(3)))
    d = diff(log, a, c).divergence
    assert d is not None and d.seq_a == d.seq_b == 11 and d.fields == ["output_tokens", "text", "tool_calls"]


# -- determinism ----------------------------------------------------------------------------


def test_determinism_untouched_session_has_no_divergence(big) -> None:
    log, sid = big
    report = check_determinism(log, sid)
    assert report.ok and report.divergence is None
    assert report.decisions_checked == 2 * (STEPS_1000 + 1)  # a ModelRequested and an act per step
    assert "no divergence" in report.render()


def test_determinism_with_retries_backoff_and_fallback(log) -> None:
    def down(messages):
        raise ProviderError("503", retryable=True, status=503, kind="server_error")

    sid = run(log, ScriptedProvider(down), policy={"retries": {"base_ms": 1, "max_ms": 3, "max_model_attempts": 2},
                                                   "fallback_models": ["small"]})
    types = [e.type for e in log.read(sid)]
    assert "RetryScheduled" in types and "ModelFallback" in types and types[-1] == "SessionFailed"
    assert check_determinism(log, sid).ok


@pytest.mark.parametrize(("kind", "field"), [("ToolRequested", "arguments_json"), ("ModelRequested", "model"),
                                             ("SessionFinished", "answer")])
def test_determinism_names_the_doctored_seq(log, tmp_path, kind, field) -> None:
    src = run(log, ScriptedProvider(adder_script(3)))
    target = [e.seq for e in log.read(src) if e.type == kind][-1]

    def change(e):
        if e.seq != target:
            return e
        value = {"arguments_json": '{"a": 2, "b": 2}', "model": "doctored", "answer": "forty-two"}[field]
        return e.model_copy(update={"payload": e.payload.model_copy(update={field: value})})

    doctored = SQLiteLog(tmp_path / "doctored.db")
    copy_session(log, src, doctored, change)
    assert check_determinism(log, src).ok
    assert verify(doctored, src).ok  # a well-formed log: only the decision differs
    report = check_determinism(doctored, src)
    d = report.divergence
    assert not report.ok and d is not None and d.seq == target and d.fields == [field]
    assert d.expected[0] == d.recorded[0] == kind
    assert d.recorded[1][field] == {"arguments_json": '{"a": 2, "b": 2}', "model": "doctored",
                                    "answer": "forty-two"}[field]
    assert f"first divergence at seq {target}" in report.render()


def test_determinism_reports_a_decision_of_another_type(log, tmp_path) -> None:
    src = run(log, ScriptedProvider(adder_script(2)))
    events = log.read(src)
    # Record a SessionFinished where the code requests the tool.
    at = next(e.seq for e in events if e.type == "ToolRequested")
    other = SQLiteLog(tmp_path / "other.db")
    other.append(src, seal([e.model_copy(update={"chain_hash": None}) for e in events[:at]], None), 0)
    state = fold(other.read(src))
    wrong = ev.SessionFinished(answer="?", steps=1, input_tokens=0, output_tokens=0)
    other.append(src, build_events(state, events[at - 1].event_id, [Emit(wrong)], "orchestrator", time_ms=1),
                 at)
    d = check_determinism(other, src).divergence
    assert d is not None and d.seq == at and d.expected[0] == "ToolRequested" and d.recorded[0] == "SessionFinished"


def test_determinism_re_makes_clock_decisions_at_the_recorded_time(log, tmp_path) -> None:
    """The driver's clock is passed in: here each model call takes 10 s, so the wall-time
    budget ends the session. The check re-makes that decision at the recorded time; moved
    earlier (doctored), the same event is a decision the code would not make."""
    clock = {"now": 1_700_000_000_000}
    inner = adder_script(5)

    def slow(messages):
        clock["now"] += 10_000
        return inner(messages)

    registry = default_registry()
    rt = Runtime(log, [Orchestrator(), ModelProcessor(ScriptedProvider(slow), registry.specs()),
                       ToolProcessor(registry)], clock=lambda: clock["now"])
    sid = rt.start_session("count", config(policy={"budgets": {"max_wall_seconds": 45}}))
    state = rt.run_session(sid)
    assert state.status == "failed" and "time budget exceeded" in state.error
    assert check_determinism(log, sid).ok
    failed = log.read(sid)[-1]
    doctored = SQLiteLog(tmp_path / "early.db")
    copy_session(log, sid, doctored,
                 lambda e: e if e.seq != failed.seq else e.model_copy(update={"time": state.started_ms + 1_000}))
    d = check_determinism(doctored, sid).divergence
    assert d is not None and d.seq == failed.seq and d.recorded[0] == "SessionFailed", d
    assert d.expected is not None and d.expected[0] != "SessionFailed"


# -- the same over Kafka -----------------------------------------------------------------------


@pytest.mark.kafka
def test_replay_verify_fork_and_diff_over_kafka(kafka_broker, tmp_path) -> None:
    import uuid

    from loopstream.kafka.log import KafkaLog

    topic = f"replay-{uuid.uuid4().hex[:8]}"
    with KafkaLog(kafka_broker, topic=topic, projection_path=tmp_path / "proj.db") as klog:
        sid = run(klog, ScriptedProvider(adder_script(3)))
        raw = klog.read_raw(sid)
        assert verify(klog, sid).ok and all(decode(b).chain_hash for b in raw)
        report = replay(klog, sid)
        assert report.ok and report.state.answer == "The result is 3."
        result = fork(klog, sid, 9, model="other", message="go on")
        build_runtime(klog, ScriptedProvider(adder_script(4), model="other")).run_session(result.child_session_id)
        assert verify(klog, result.child_session_id).ok
        assert check_determinism(klog, result.child_session_id).ok
        assert diff(klog, sid, result.child_session_id).relation == "b is a fork of a at seq 9"
        with SQLiteLog(tmp_path / "same.db") as slog:  # the same bytes verify from SQLite
            slog.append(sid, [decode(b) for b in raw], 0)
            assert slog.read_raw(sid) == raw and verify(slog, sid).ok


# -- the command-line entry points -------------------------------------------------------------


def test_commands_print_and_exit_as_the_cli_should(log, tmp_path) -> None:
    from loopstream.replay import commands as c

    sid = run(log, ScriptedProvider(adder_script(2)))
    r = c.replay_command(log, sid)
    assert r.exit_code == 0 and "chain ok" in r.text and r.error == ""
    assert c.replay_command(log, sid, 4).text.splitlines()[0].endswith("0 tool calls")
    assert c.replay_command(log, sid, verify_only=True).text.startswith("chain ok: 13 events")
    data = json.loads(c.replay_command(log, sid, as_json=True).text)
    assert data["ok"] and data["status"] == "done" and data["timeline"][2]["kind"] == "model"
    assert c.check_command(log, sid).exit_code == 0
    assert c.diff_command(log, sid, sid).exit_code == 0

    f = c.fork_command(log, sid, 5, model="m2", message="more", reason="r")
    assert f.exit_code == 0 and f.data.child_session_id in f.text and "loopstream resume" in f.text
    assert c.diff_command(log, sid, f.data.child_session_id).exit_code == 1
    assert c.export_command(log, sid, tmp_path / "x.avro").text.startswith("wrote 13 events")

    data = bytearray(log.read_raw(sid, 7, 7)[0])
    data[20] ^= 1
    tamper(log, sid, 7, bytes(data))
    r = c.replay_command(log, sid)
    assert r.exit_code == 1 and r.error.startswith("first bad seq 7:") and "BROKEN at seq 7" in r.text
    assert c.check_command(log, sid).exit_code == 1
    with pytest.raises(ValueError):
        c.replay_command(log, sid, -1)


def test_fork_command_asks_for_acknowledgement_with_exit_3(log) -> None:
    from loopstream.replay import commands as c

    @tool(read_only=False)
    def deploy(env: str) -> str:
        """Deploy."""
        return "ok"

    def script(messages):
        if not any(m.role == "tool" for m in messages):
            return ModelReply(tool_calls=[ToolCall(call_id="d", name="deploy", arguments={"env": "prod"})])
        return ModelReply(text="deployed")

    registry = default_registry().add(deploy)
    sid = run(log, ScriptedProvider(script), registry=registry, tools=["deploy"])
    r = c.fork_command(log, sid, 2, registry=registry)
    assert r.exit_code == 3 and "deploy" in r.text and "--yes" in r.text
    r = c.fork_command(log, sid, 2, registry=registry, yes=True)
    assert r.exit_code == 0 and "acknowledged side effect: seq" in r.text


def test_fork_never_lands_inside_an_atomic_batch(log) -> None:
    def two_calls(messages):
        if not any(m.role == "tool" for m in messages):
            return ModelReply(tool_calls=[ToolCall(call_id="a", name="add", arguments={"a": 1, "b": 1}),
                                          ToolCall(call_id="b", name="add", arguments={"a": 2, "b": 2})])
        return ModelReply(text="2 and 4")

    parent = run(log, ScriptedProvider(two_calls))
    events = log.read(parent)
    first, second = [e.seq for e in events if e.type == "ToolRequested"]
    assert second == first + 1
    with pytest.raises(ForkError, match=rf"inside an atomic batch \(seqs {first}..{second}.*fork at {second} or {first - 1}"):
        fork(log, parent, first)
    result = fork(log, parent, second)  # after the batch: both calls are owed, both rerun
    state = build_runtime(log, ScriptedProvider(two_calls)).run_session(result.child_session_id)
    assert state.answer == "2 and 4" and state.tool_calls == 2


def test_a_fork_message_is_redacted_like_any_payload(log, monkeypatch) -> None:
    monkeypatch.setenv("DEMO_API_KEY", "sk-very-secret-value")
    parent = run(log, ScriptedProvider(adder_script(1)))
    result = fork(log, parent, 5, message="use key sk-very-secret-value please", reason="sk-very-secret-value")
    raw = b"".join(log.read_raw(result.child_session_id))
    assert b"sk-very-secret-value" not in raw and b"[REDACTED:DEMO_API_KEY]" in raw


def test_session_rows_name_the_model_of_the_last_reply(tmp_path: Path) -> None:
    """`sessions`' model column: the last ModelResponded's model, found by reading a long
    session backwards in chunks; a session no model answered yet shows SessionStarted's."""
    with SQLiteLog(tmp_path / "rows.db") as log:
        runtime = build_runtime(log, scripted_from_spec("adder:20"))
        config = SessionConfig(provider="any", model="default", tools=["add"], max_steps=30)
        answered = runtime.start_session("count to twenty", config)
        assert runtime.run_session(answered).status == "done"
        waiting = runtime.start_session("not started", config)
        rows = {r.session_id: r for r in session_rows(log)}
        assert rows[answered].events > 64 and rows[answered].model == "scripted:adder:20"
        assert rows[waiting].model == "default"
        assert answered_by(log.read(answered)) == ["scripted:adder:20"]
