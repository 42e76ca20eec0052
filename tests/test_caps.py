"""Unbounded text never reaches the log: every text field written from outside (errors,
tool results, model replies, goals, user messages, reasons) is capped in the writer, and
the cut is recorded in the text (core/secrets.py: TEXT_LIMITS, sanitize)."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loopstream.core import events as ev
from loopstream.core.secrets import (
    DEFAULT_TEXT_LIMIT,
    TEXT_LIMITS,
    UNCAPPED,
    cap,
    cap_text,
    limit_for,
    redact,
    sanitize,
)
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.providers.base import ModelReply, ToolCall
from loopstream.providers.scripted import ScriptedProvider
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig
from loopstream.tools import ToolRegistry, tool

TEN_MB = 10 * 1024 * 1024
CUT = re.compile(r"…\[(\d+) more characters cut\]$")


@tool
def explode(size: int = TEN_MB) -> str:
    """Fails with a huge message (a tool that dumps a whole document into its exception)."""
    raise ValueError("E" * size + "-END")


@tool
def mojibake() -> str:
    """Returns text decoded with surrogateescape, as a filename with bad bytes would be."""
    return b"caf\xe9 \xff ok".decode("utf-8", "surrogateescape")


@pytest.fixture
def log(tmp_path):
    with SQLiteLog(tmp_path / "caps.db") as log:
        yield log


def run(log, replies, goal="go", tools=()):
    seen: list[int] = []

    def script(messages):
        seen.append(max(len(m.content) for m in messages))
        return replies.pop(0)

    registry = ToolRegistry().add(*tools)
    rt = build_runtime(log, ScriptedProvider(script), registry)
    sid = rt.start_session(goal, SessionConfig(provider="scripted", model="s", tools=registry.names()))
    return rt, sid, rt.run_session(sid), seen


def assert_cut(text: str, limit: int, original_length: int) -> None:
    assert len(text) <= limit
    m = CUT.search(text)
    assert m, text[-80:]
    assert len(text) - len(m.group(0)) + int(m.group(1)) == original_length  # kept + cut = all


def test_a_10_mb_exception_from_a_real_tool_is_capped_in_the_log_and_the_context(log) -> None:
    replies = [ModelReply(tool_calls=[ToolCall(call_id="1", name="explode", arguments={})]),
               ModelReply(text="the tool failed")]
    rt, sid, state, seen = run(log, replies, tools=[explode])
    assert state.status == "done"
    (failed,) = [e.payload for e in log.read(sid) if e.type == "ToolFailed"]
    limit = TEXT_LIMITS[("ToolFailed", "message")]
    assert failed.error_kind == "tool_exception" and failed.message.startswith("ValueError: EEEE")
    assert_cut(failed.message, limit, len("ValueError: ") + TEN_MB + len("-END"))
    assert seen[-1] <= limit + 100  # the model's context got the capped text ("ERROR (kind): " in front)
    stored = sum(len(b) for b in log.read_raw(sid))
    assert stored < 3 * limit, stored  # the whole session, not 10 MB
    print(f"10 MB exception: ToolFailed.message {len(failed.message)} chars; session stored in {stored} bytes")


def test_a_10_mb_goal_reply_and_user_message_are_capped(log) -> None:
    huge = "x" * TEN_MB
    rt, sid, state, seen = run(log, [ModelReply(text=huge), ModelReply(text="fine")], goal=huge)
    assert state.status == "done"
    events = log.read(sid)
    goal = next(e.payload.text for e in events if e.type == "GoalReceived")
    reply = next(e.payload.text for e in events if e.type == "ModelResponded")
    assert_cut(goal, TEXT_LIMITS[("GoalReceived", "text")], TEN_MB)
    assert_cut(reply, TEXT_LIMITS[("ModelResponded", "text")], TEN_MB)
    assert state.answer == reply  # the answer is the stored reply, cut the same way
    assert max(len(b) for b in log.read_raw(sid)) < 2 * TEXT_LIMITS[("GoalReceived", "text")]


def test_a_person_s_huge_message_and_reason_are_capped(log) -> None:
    huge = "y" * TEN_MB
    registry = ToolRegistry()
    rt = build_runtime(log, ScriptedProvider([ModelReply(text="ok"), ModelReply(text="ok again")]), registry)
    sid = rt.start_session("hi", SessionConfig(provider="scripted", model="s", tools=[]))
    rt.writer.record(sid, [ev.SessionCancelled(reason=huge)], actor="person:test")
    (cancelled,) = [e.payload for e in log.read(sid) if e.type == "SessionCancelled"]
    assert_cut(cancelled.reason, DEFAULT_TEXT_LIMIT, TEN_MB)
    other = rt.start_session("hi", SessionConfig(provider="scripted", model="s", tools=[]))
    rt.writer.record(other, [ev.UserMessage(text=huge)], actor="person:test")
    (message,) = [e.payload for e in log.read(other) if e.type == "UserMessage"]
    assert_cut(message.text, TEXT_LIMITS[("UserMessage", "text")], TEN_MB)


def test_text_utf8_cannot_carry_is_repaired_not_a_crash(log) -> None:
    replies = [ModelReply(tool_calls=[ToolCall(call_id="1", name="mojibake", arguments={})]),
               ModelReply(text="done \udc80")]
    rt, sid, state, _ = run(log, replies, tools=[mojibake])
    assert state.status == "done" and state.answer == "done \ufffd"
    (completed,) = [e.payload for e in log.read(sid) if e.type == "ToolCompleted"]
    assert completed.result == "caf\ufffd \ufffd ok"


def test_cap_text_keeps_what_fits_and_counts_what_it_cuts() -> None:
    assert cap_text("a" * 100, 100) == "a" * 100
    for n in (101, 1000, 10**6):
        out = cap_text("a" * n, 100)
        assert_cut(out, 100, n)
    payload = ev.ToolFailed(call_id="c", name="t", error_kind="k", message="m" * 50_000, latency_ms=1)
    assert len(cap(payload).message) <= TEXT_LIMITS[("ToolFailed", "message")]
    small = ev.ToolFailed(call_id="c", name="t", error_kind="k", message="short", latency_ms=1)
    assert cap(small) is small


def test_the_limits_name_real_fields_and_every_text_field_has_one() -> None:
    """Declared once and checked: a misspelt entry would silently fall back to the default."""
    records = {"ToolCallRecord": ev.ToolCallRecord, "ChildRecord": ev.ChildRecord}
    types = {**ev.PAYLOAD_TYPES, **records}
    for owner, field in [*TEXT_LIMITS, *UNCAPPED]:
        assert owner in types and field in types[owner].model_fields, (owner, field)
    for name, model in types.items():
        for field, info in model.model_fields.items():
            if info.annotation in (str, str | None):
                limit = limit_for(name, field)
                assert limit is not None or field.endswith("_json"), (name, field)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=60), st.text(alphabet="ghp_sk-AIza:/@[]REDACTEDxab0123", max_size=80),
                      st.text(max_size=5000)))
def test_sanitize_is_redact_then_cap_whatever_the_text(text: str) -> None:
    """The writer's one-pass `sanitize` (with its fast path for plain short text) stores what
    redacting and then capping would."""
    for payload in (ev.GoalReceived(text=text), ev.ToolFailed(call_id="c", name=text[:30], error_kind="k",
                                                              message=text, latency_ms=1)):
        assert sanitize(payload) == cap(redact(payload))
