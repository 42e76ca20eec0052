"""Answer checks (processors/answers.py, policy `answers`) over a real SQLite log with a scripted
model: an answer that echoes the last tool error, or comes before calling the tool the goal asks
for, is refused once with a reason the model is told; the refusal is an event, so replay shows it
and decides the same."""
from __future__ import annotations

import pytest

from loopstream.core.policy import SessionPolicy
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.processors.answers import QUOTE_CHARS, echoes, named_tool
from loopstream.providers.base import ModelReply, ToolCall
from loopstream.providers.scripted import ScriptedProvider
from loopstream.replay import check_determinism
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig


@pytest.fixture
def log(tmp_path):
    with SQLiteLog(tmp_path / "answers.db") as log:
        yield log


def calc(i: int, expression: str) -> ModelReply:
    return ModelReply(tool_calls=[ToolCall(call_id=f"c{i}", name="calculate", arguments={"expression": expression})])


def run(log, goal: str, replies, **policy):
    policy["answers"] = {"enabled": True, **policy.get("answers", {})}  # off by default
    rt = build_runtime(log, ScriptedProvider(list(replies)))
    sid = rt.start_session(goal, SessionConfig(provider="scripted", model="scripted", tools=["add", "calculate"],
                                               max_steps=8, policy=SessionPolicy(**policy)))
    state = rt.run_session(sid)
    return sid, state, log.read(sid)


def trips(events) -> list:
    return [e.payload for e in events if e.type == "GuardrailTripped"]


def test_an_answer_echoing_the_tool_error_is_refused_and_the_model_recovers(log) -> None:
    sid, state, events = run(log, "What is 2 to the power of 10?", [
        calc(1, "2 ^^ 10"),
        ModelReply(text="Error: not an arithmetic expression: '2 ^^ 10'"),  # the echo
        calc(2, "2 ** 10"),
        ModelReply(text="1024"),
    ])
    assert state.status == "done" and state.answer == "1024"
    [trip] = trips(events)
    assert trip.rule == "echoed_error" and trip.action == "tell_model" and trip.stage == "output"
    assert "not an arithmetic expression" in trip.message and "Fix the call" in trip.message
    assert any(m.role == "user" and m.content == trip.message for m in state.messages)  # the model was told
    assert check_determinism(log, sid).ok


def test_after_the_nudges_the_echoed_answer_stands(log) -> None:
    echo = ModelReply(text="not an arithmetic expression: 'x y'")
    sid, state, events = run(log, "compute x y", [calc(1, "x y"), echo, echo])
    assert state.status == "done" and state.answer == echo.text  # an unreachable goal may end in its error
    assert [t.rule for t in trips(events)] == ["echoed_error"]


def test_an_answer_before_calling_the_named_tool_is_refused(log) -> None:
    sid, state, events = run(log, "What is 40213 + 1999? Use the add tool.", [
        ModelReply(text="42000"),  # from memory, and wrong
        ModelReply(tool_calls=[ToolCall(call_id="c1", name="add", arguments={"a": 40213, "b": 1999})]),
        ModelReply(text="42212"),
    ])
    assert state.status == "done" and state.answer == "42212"
    [trip] = trips(events)
    assert trip.rule == "named_tool" and "use the add tool" in trip.message
    assert check_determinism(log, sid).ok


def test_a_tool_name_used_as_a_word_or_a_tool_already_called_is_not_asked_for(log) -> None:
    _, state, events = run(log, "add things up in your head: 2 and 3", [ModelReply(text="5")])
    assert state.status == "done" and trips(events) == []
    _, state, events = run(log, "Use the add tool for 2 + 3", [
        ModelReply(tool_calls=[ToolCall(call_id="c1", name="add", arguments={"a": 2, "b": 3})]),
        ModelReply(text="5")])
    assert state.status == "done" and trips(events) == []


def test_the_checks_are_off_by_default(log) -> None:
    rt = build_runtime(log, ScriptedProvider([ModelReply(text="2")]))
    sid = rt.start_session("Use the add tool: 1+1", SessionConfig(provider="scripted", model="s", tools=["add"]))
    assert rt.run_session(sid).answer == "2" and trips(log.read(sid)) == []


def test_the_checks_can_be_switched_off_each_or_all(log) -> None:
    replies = [calc(1, "2 ^^ 10"), ModelReply(text="not an arithmetic expression: '2 ^^ 10'")]
    _, state, events = run(log, "Use the calculate tool: 2^10", replies, answers={"enabled": False})
    assert state.status == "done" and trips(events) == []
    _, state, events = run(log, "Use the calculate tool: 2^10", replies, answers={"echoed_error": False})
    assert state.status == "done" and trips(events) == []
    _, state, events = run(log, "Use the add tool: 1+1", [ModelReply(text="2")], answers={"named_tool": False})
    assert state.status == "done" and trips(events) == []
    _, state, events = run(log, "Use the add tool: 1+1", [ModelReply(text="2")], answers={"nudges": 0})
    assert state.status == "done" and trips(events) == []


def test_hostile_error_text_is_quoted_bounded_and_as_it_is(log) -> None:
    hostile = "[bold]<script>alert(1)</script>\udcff" + "z" * 50_000
    sid, state, events = run(log, "compute it", [calc(1, hostile), ModelReply(text=f"not an arithmetic expression: {hostile!r}"),
                                                  ModelReply(text="I cannot compute that expression.")])
    assert state.status == "done" and state.answer == "I cannot compute that expression."
    [trip] = trips(events)
    assert trip.rule == "echoed_error" and len(trip.message) < QUOTE_CHARS + 400
    assert "<script>" in trip.message  # quoted as text, not interpreted or dropped
    assert check_determinism(log, sid).ok


@pytest.mark.parametrize(("answer", "error", "echo"), [
    ("not found", "not found", False),  # too short to tell an echo from an answer
    ("Division by zero.", "division by zero", True),
    ("The tool said: not an arithmetic expression: '2^^'", "not an arithmetic expression: '2^^'", True),
    ("not an arithmetic", "not an arithmetic expression: '2^^'", True),  # a part of the error
    ("1024", "not an arithmetic expression: '2^^'", False),
    ("", "not an arithmetic expression: '2^^'", False),
])
def test_what_counts_as_an_echo(answer, error, echo) -> None:
    assert echoes(answer, error) is echo


@pytest.mark.parametrize(("goal", "tool"), [
    ("What is 1+1? Use the add tool.", "add"), ("Compute it with the calculate tool", "calculate"),
    ("USING   ADD please", "add"), ("Add 1 and 2", None), ("use the adder", None), ("use add-on", None),
])
def test_which_goals_ask_for_a_tool(goal, tool) -> None:
    assert named_tool(goal, ["add", "calculate"]) == tool


def test_a_denial_reported_as_the_answer_is_not_refused(log) -> None:
    deny = {"default": "allow", "rules": [{"tool": "calculate", "action": "deny", "reason": "no maths today"}]}
    _, state, events = run(log, "Use the calculate tool: 6 * 7", [
        calc(1, "6 * 7"), ModelReply(text="permission denied: no maths today")], permissions=deny)
    assert any(e.type == "ToolFailed" and e.payload.error_kind == "permission_denied" for e in events)
    assert state.status == "done" and state.answer == "permission denied: no maths today"
    assert trips(events) == []  # retrying differently cannot fix a denial: reporting it is an answer
