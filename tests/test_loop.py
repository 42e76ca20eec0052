"""The loop end to end over a real SQLite log with a scripted model."""
from __future__ import annotations

import pytest

from loopstream.core.log import DuplicateEvent
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from loopstream.processors.model import ModelProcessor
from loopstream.processors.orchestrator import Orchestrator
from loopstream.processors.tools import ToolProcessor
from loopstream.providers.base import ModelReply, ProviderError, ToolCall
from loopstream.providers.scripted import ScriptedProvider, adder_script
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.dispatch import Dispatch
from loopstream.runtime.inline import SessionConfig
from loopstream.runtime.writer import build_events
from loopstream.tools import default_registry, tool


@pytest.fixture
def log(tmp_path):
    with SQLiteLog(tmp_path / "loop.db") as log:
        yield log


def config(**kw) -> SessionConfig:
    kw.setdefault("tools", ["add", "calculate"])
    kw.setdefault("policy", {"retries": {"base_ms": 20, "max_ms": 50}})
    return SessionConfig(provider="scripted", model="scripted", **kw)


def types(log, sid):
    return [e.type for e in log.read(sid)]


def test_scripted_session_runs_to_done(log) -> None:
    rt = build_runtime(log, ScriptedProvider(adder_script(2)))
    sid = rt.start_session("count to two", config())
    state = rt.run_session(sid)
    assert state.status == "done" and state.answer == "The result is 2."
    assert types(log, sid) == ["SessionStarted", "GoalReceived"] + [
        "ModelRequested", "ModelResponded", "ToolRequested", "ToolCompleted"] * 2 + [
        "ModelRequested", "ModelResponded", "SessionFinished"]
    # The fold of the stored log is the state the runtime ended with.
    assert fold(log.read(sid)) == state
    # Causation links each event to the one that made it.
    events = log.read(sid)
    by_id = {e.event_id: e for e in events}
    for e in events[2:]:
        assert e.causation_id in by_id and by_id[e.causation_id].seq < e.seq


def reply_with(*calls: ToolCall, text: str = "") -> ModelReply:
    return ModelReply(text=text, tool_calls=list(calls))


def test_bad_arguments_and_unknown_tools_go_back_to_the_model(log) -> None:
    provider = ScriptedProvider([
        reply_with(ToolCall(call_id="1", name="add", arguments={"a": "forty"}),
                   ToolCall(call_id="2", name="launch_rockets", arguments={})),
        reply_with(text="I could not add that."),
    ])
    rt = build_runtime(log, provider)
    state = rt.run_session(rt.start_session("add", config()))
    assert state.status == "done"
    failed = [e.payload for e in log.read(state.session_id) if e.type == "ToolFailed"]
    assert [f.error_kind for f in failed] == ["invalid_arguments", "unknown_tool"]
    assert "a: Input should be a valid number" in failed[0].message and "b: Field required" in failed[0].message
    # The model saw both errors on its next step.
    tool_msgs = [m.content for m in state.messages if m.role == "tool"]
    assert tool_msgs[0].startswith("ERROR (invalid_arguments)") and "launch_rockets" in tool_msgs[1]


def test_a_tool_that_raises_is_reported_not_fatal(log) -> None:
    @tool
    def flaky(x: int) -> str:
        """Always breaks."""
        raise RuntimeError("disk on fire")

    registry = default_registry().add(flaky)
    provider = ScriptedProvider([reply_with(ToolCall(call_id="1", name="flaky", arguments={"x": 1})),
                                 reply_with(text="gave up")])
    rt = build_runtime(log, provider, registry)
    state = rt.run_session(rt.start_session("go", config(tools=["flaky"])))
    assert state.status == "done"
    (failed,) = [e.payload for e in log.read(state.session_id) if e.type == "ToolFailed"]
    assert failed.error_kind == "tool_exception" and "disk on fire" in failed.message


def test_model_failures_are_retried_then_the_session_fails_with_a_reason(log) -> None:
    boom = ProviderError("server overloaded", retryable=True, status=503, kind="unavailable")
    ok = ScriptedProvider([boom, boom, reply_with(text="fine")])
    rt = build_runtime(log, ok)
    state = rt.run_session(rt.start_session("x", config()))
    # Scripted lists are indexed by assistant turns, so the same failure repeats until a reply lands.
    assert state.status == "failed"
    assert types(log, state.session_id).count("ModelFailed") == 3
    assert types(log, state.session_id).count("RetryScheduled") == 2
    assert "model failed: scripted failed 3 time(s); last error: server overloaded" == state.error


def test_a_retry_after_one_failure_succeeds(log) -> None:
    calls = {"n": 0}

    def script(messages):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ProviderError("rate limited", retryable=True, status=429, kind="rate_limit")
        return reply_with(text="42")

    rt = build_runtime(log, ScriptedProvider(script))
    state = rt.run_session(rt.start_session("x", config()))
    assert state.status == "done" and state.answer == "42"
    requests = [e.payload for e in log.read(state.session_id) if e.type == "ModelRequested"]
    assert [(r.step, r.attempt) for r in requests] == [(1, 1), (1, 2)]


def test_step_budget_ends_the_session_with_a_reason(log) -> None:
    rt = build_runtime(log, ScriptedProvider(adder_script(100)))
    state = rt.run_session(rt.start_session("forever", config(max_steps=3)))
    assert state.status == "failed" and "step budget exhausted: 3" in state.error
    assert types(log, state.session_id)[-1] == "SessionFailed"


def test_resume_after_a_stop_mid_session_loses_and_duplicates_nothing(log) -> None:
    """Stop the runtime after every possible number of dispatches; a new runtime finishes."""
    full = build_runtime(log, ScriptedProvider(adder_script(2)))
    reference = types(log, full.run_session(full.start_session("ref", config())).session_id)
    for stop_after in range(1, len(reference)):
        rt = build_runtime(log, ScriptedProvider(adder_script(2)))
        sid = rt.start_session("count", config())
        try:
            rt.run_session(sid, max_events=stop_after)
        except Exception:
            pass  # RuntimeStuck: the budget ran out mid-session, as a crash would
        again = build_runtime(log, ScriptedProvider(adder_script(2)))
        assert again.run_session(sid).status == "done"
        assert types(log, sid) == reference, f"stopped after {stop_after}"


def test_redelivered_request_does_not_produce_a_second_result(log) -> None:
    provider = ScriptedProvider(adder_script(1))
    rt = build_runtime(log, provider)
    sid = rt.start_session("x", config())
    state = rt.run_session(sid)
    events = log.read(sid)
    request = next(e for e in events if e.type == "ModelRequested")
    # Handle the same request again against the state as it was then: the emitted event
    # has the same deterministic id, and the log refuses the copy.
    then = fold(events[: request.seq + 1])
    model = ModelProcessor(provider, default_registry().specs())
    emits = model.handle(request, then, request.time)
    dup = build_events(then, request.event_id, emits, "model")
    assert dup[0].event_id == events[request.seq + 1].event_id
    with pytest.raises(DuplicateEvent):
        log.append(sid, dup, then.next_seq)
    assert len(log.read(sid)) == len(events) and state.status == "done"


def test_repeated_idempotency_key_starts_nothing_new(log) -> None:
    rt = build_runtime(log, ScriptedProvider(adder_script(1)))
    a = rt.start_session("x", config(), idempotency_key="order-17")
    b = rt.start_session("x", config(), idempotency_key="order-17")
    assert a == b and len(log.read(a)) == 2 and len(log.sessions()) == 1


def test_nothing_is_dispatched_for_what_is_no_longer_owed(log) -> None:
    """Once the session is done, no event of its log is owed: the dispatch rule hands none
    of them to a processor (the processors themselves no longer check)."""
    rt = build_runtime(log, ScriptedProvider(adder_script(1)))
    state = rt.run_session(rt.start_session("x", config()))
    dispatch = Dispatch([Orchestrator(), ModelProcessor(ScriptedProvider(adder_script(1)), []),
                         ToolProcessor(default_registry())])
    assert dispatch.actors == {"orchestrator", "model", "tools"}
    assert [e.seq for e in log.read(state.session_id) if dispatch.owed(state, e.seq)] == []
    # Before the end, exactly one event at a time was owed: the one the next batch answers.
    events = log.read(state.session_id)
    for e in events[2:]:
        before = fold(events[: e.seq])
        owed = dispatch.owed(before, next(c.seq for c in events if c.event_id == e.causation_id))
        assert owed is not None and owed.actor == {"orchestrator": "orchestrator", "model": "model",
                                                   "tools": "tools"}[e.actor], (e.seq, e.type)
