"""Loop detection (processors/loops.py) over a real SQLite log with a scripted model: a model
that repeats a call, repeats its reply or alternates between two calls is told once, with the
earlier result, then stopped; every detection is an event, so replay shows it and decides the same."""
from __future__ import annotations

import json

import pytest

from loopstream.core import events as ev
from loopstream.core.policy import Loops, PolicyError, SessionPolicy, load_policy, recorded_policy
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from loopstream.providers.base import ModelReply, ToolCall
from loopstream.providers.scripted import ScriptedProvider
from loopstream.replay import check_determinism
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig


@pytest.fixture
def log(tmp_path):
    with SQLiteLog(tmp_path / "loops.db") as log:
        yield log


def config(**policy) -> SessionConfig:
    return SessionConfig(provider="scripted", model="scripted", tools=["add", "calculate"], max_steps=12,
                         policy=policy)


def call(i: int, name: str = "add", **arguments) -> ModelReply:
    return ModelReply(tool_calls=[ToolCall(call_id=f"c{i}", name=name, arguments=arguments or {"a": 1, "b": 2})])


def answer(text: str = "3") -> ModelReply:
    return ModelReply(text=text)


def run(log, replies, **policy):
    rt = build_runtime(log, ScriptedProvider(list(replies)))
    sid = rt.start_session("add 1 and 2", config(**policy))
    state = rt.run_session(sid)
    return sid, state, log.read(sid)


def loops_of(events) -> list[ev.LoopDetected]:
    return [e.payload for e in events if e.type == "LoopDetected"]


def test_a_repeated_call_is_answered_with_the_earlier_result_and_the_model_recovers(log) -> None:
    sid, state, events = run(log, [call(1), call(2), call(3), answer("3")])
    assert state.status == "done" and state.answer == "3"
    [loop] = loops_of(events)
    assert loop.kind == "repeated_call" and loop.action == "tell_model" and [c.rsplit(".", 1)[-1] for c in loop.call_ids] == ["c3"]
    assert "Its result was:\n3" in loop.message and 'add({"a": 1, "b": 2})' in loop.message
    assert sum(e.type == "ToolCompleted" for e in events) == 2  # the third call never ran
    # the model saw the note as the call's result (the provider protocol wants one per call)
    tool_messages = [m for m in fold(events).messages if m.role == "tool"]
    assert tool_messages[-1].tool_call_id == loop.call_ids[0] and tool_messages[-1].content == loop.message
    assert check_determinism(log, sid).divergence is None


def test_a_model_that_keeps_repeating_is_stopped_with_a_clear_reason(log) -> None:
    sid, state, events = run(log, [call(i) for i in range(1, 13)])
    assert state.status == "failed"
    failed = events[-1].payload
    assert failed.error_kind == "loop" and "repeated_call" in failed.reason and "told 1 time" in failed.reason
    assert [(p.kind, p.action) for p in loops_of(events)] == [("repeated_call", "tell_model"),
                                                             ("repeated_call", "stop")]
    assert state.step == 4  # not 12: the step budget is not what ends it
    assert check_determinism(log, sid).divergence is None


def test_repeated_identical_replies(log) -> None:
    # the same reply (text and calls) three times: the calls differ from earlier ones only by id
    same = [ModelReply(text="checking", tool_calls=[ToolCall(call_id=f"r{i}", name="add", arguments={"a": 5, "b": 5})])
            for i in range(3)]
    _, state, events = run(log, [*same, answer("10")], loops={"max_identical_calls": 5, "max_identical_replies": 2})
    [loop] = loops_of(events)
    assert loop.kind == "repeated_reply" and "same reply 3 times" in loop.detail
    assert state.status == "done"


def test_oscillation_between_two_calls(log) -> None:
    a, b = {"a": 1, "b": 1}, {"a": 2, "b": 2}
    replies = [call(1, **a), call(2, **b), call(3, **a), call(4, **b), answer("done")]
    _, state, events = run(log, replies)
    [loop] = loops_of(events)
    assert loop.kind == "oscillation" and [c.rsplit(".", 1)[-1] for c in loop.call_ids] == ["c4"]
    assert "2" in loop.message and "4" in loop.message  # both latest results are quoted
    assert state.status == "done"


def test_different_arguments_are_not_a_loop(log) -> None:
    replies = [call(i, a=i, b=1) for i in range(1, 8)] + [answer("8")]
    _, state, events = run(log, replies)
    assert loops_of(events) == [] and state.status == "done"


def test_detection_can_be_turned_off_and_tuned(log, tmp_path) -> None:
    _, state, events = run(log, [call(i) for i in range(1, 6)] + [answer()], loops={"enabled": False})
    assert loops_of(events) == [] and state.status == "done"
    _, state, events = run(log, [call(i) for i in range(1, 6)] + [answer()], loops={"nudges": 0})
    assert [p.action for p in loops_of(events)] == ["stop"] and state.status == "failed"
    policy_file = tmp_path / "p.toml"
    policy_file.write_text("[loops]\nmax_identical_call = 3\n")  # misspelt
    with pytest.raises(PolicyError, match=r"loops\.max_identical_call"):
        load_policy(policy_file)
    policy_file.write_text("[loops]\nwindow = 1\n")
    with pytest.raises(PolicyError, match=r"loops\.window"):
        load_policy(policy_file)


def test_hostile_arguments_are_clipped_in_the_detail_and_survive_the_log(log) -> None:
    huge = "<b>" + "\ud800" + "x" * 100_000
    replies = [call(i, name="calculate", expression=huge) for i in range(1, 4)] + [answer("no")]
    sid, state, events = run(log, replies)
    [loop] = loops_of(events)
    assert len(loop.detail) < 400 and state.status == "done"
    assert check_determinism(log, sid).divergence is None


def test_a_session_recorded_before_loop_detection_replays_without_it(log) -> None:
    """A recorded policy without `loops` folds with detection off: the replay check runs today's
    orchestrator on it and must decide what the old code decided (run the calls)."""
    replies = [call(i) for i in range(1, 5)] + [answer()]
    sid, state, events = run(log, replies, loops={"enabled": False})
    started = events[0].payload
    assert json.loads(started.config_json)["loops"] == {"enabled": False}
    policy = SessionPolicy.model_validate({})
    assert policy.loops == Loops() and policy.loops.enabled
    # the same events with the old recording ("{}") fold to a policy with detection off
    assert recorded_policy("{}").loops.enabled is False
    assert check_determinism(log, sid).divergence is None and state.status == "done"
