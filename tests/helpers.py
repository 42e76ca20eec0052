"""Small builders shared by tests (real components only: no fakes of our own parts)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from loopstream.core import codec
from loopstream.core import events as ev
from loopstream.core.codec import REGISTRY, CodecError

SAMPLE_PAYLOADS: list[ev.Payload] = [
    ev.SessionStarted(agent="a", provider="scripted", model="m", system_prompt="be brief",
                      tools=["add", "read_file"], max_steps=5, workdir="/tmp", config_json='{"x": 1}'),
    ev.GoalReceived(text="What is 2 + 2?", idempotency_key="k1", reply_topic=None),
    ev.ModelRequested(request_id="r1", step=1, attempt=1, model="m"),
    ev.ModelResponded(request_id="r1", text="", tool_calls=[
        ev.ToolCallRecord(call_id="c1", name="add", arguments_json='{"a": 2, "b": 2}')],
        input_tokens=12, output_tokens=7, latency_ms=30, finish_reason="stop", mode="json_schema", model="m",
        estimated_input_tokens=11, estimated_tool_tokens=4),
    ev.ModelFailed(request_id="r1", error_kind="rate_limit", message="429", retryable=True, status=429, latency_ms=5,
                   retry_after_ms=2000),
    ev.RetryScheduled(target="model", ref_id="r1", attempt=2, delay_ms=2000, not_before_ms=1_800_000_000_000,
                      reason="429"),
    ev.ModelFallback(from_model="big", to_model="small", reason="big failed 3 times"),
    ev.ToolRequested(call_id="c1", name="add", arguments_json='{"a": 2, "b": 2}', step=1),
    ev.ToolCompleted(call_id="c1", name="add", result="4", latency_ms=1),
    ev.ToolFailed(call_id="c1", name="add", error_kind="invalid_arguments", message="a: missing", latency_ms=1),
    ev.SessionFinished(answer="4", steps=2, input_tokens=30, output_tokens=12),
    ev.SessionFailed(reason="max steps", error_kind="max_steps"),
    ev.SessionCancelled(reason="user"),
    ev.SessionForked(parent_session_id="p1", parent_seq=4, parent_event_hash="ab" * 32, reason="try another model",
                     overrides_json='{"model": "small"}', acknowledged_side_effects_json="[]"),
    ev.UserMessage(text="Now add 3."),
    ev.GoalVerificationRequested(iteration=1, command="python -m pytest -q"),
    ev.GoalVerified(iteration=1, passed=False, exit_code=1, output="1 failed", latency_ms=812),
    ev.GoalPaused(by="alice", reason="lunch"),
    ev.GoalResumed(by="alice"),
    ev.WorkspaceCheckpointed(call_id="c1", commit="ab" * 20, workdir="/tmp", files_changed=2),
    ev.EvalGraded(suite="arith", case_id="add", variant="a", trial=1, grader="answer", kind="exact", passed=True,
                  score=1.0, detail="'4' == '4'"),
    ev.FeedbackGiven(by="person:ada", score=0.5, comment="right answer, too many steps"),
    ev.MemoryRecalled(namespace="ada/default/proj", query="add numbers", memory_ids=["m1"],
                      text="Memories from earlier sessions:\n- [m1] prefer the add tool", tokens=12, budget_tokens=400),
    ev.MemoryRemembered(memory_id="m1", namespace="ada/default/proj", text="prefer the add tool", kind="fact",
                        source="session s1"),
    ev.MemoryForgotten(memory_id="m1", namespace="ada/default/proj", by="ada", reason="stale"),
    ev.CompactionRequested(request_id="k1", from_seq=3, to_seq=20, estimated_tokens=900, budget_tokens=800),
    ev.ContextCompacted(request_id="k1", from_seq=3, to_seq=20, summary="added twice", method="model",
                        tokens_before=900, tokens_after=300),
    ev.ContextOverBudget(estimated_tokens=1200, budget_tokens=800,
                         reason="the 4 newest messages, kept verbatim, take ~700 tokens"),
    ev.GuardrailTripped(stage="tool_call", rule="reviewer", message="blocked", action="tell_model", call_id="c1"),
    ev.HookDecided(point="PreToolUse", hook="./check.py", call_id="c1", decision="allow", reason="fine",
                   arguments_json='{"a": 1}', context="note", latency_ms=3),
    ev.LoopDetected(kind="repeated_call", action="tell_model", message="You already called add(a=1) twice.",
                    call_ids=["c1"], detail="add {\"a\": 1} made 3 times"),
    ev.ToolCallReviewed(call_id="c1", allowed=False, reason="not needed", model="m", input_tokens=40,
                        output_tokens=9, latency_ms=12),
    ev.ApprovalRequested(call_id="c1", name="add", arguments_json='{"a": 1}', reason="rule 1: ask add"),
    ev.ApprovalDecided(call_id="c1", approved=True, by="person:ada", reason=""),
    ev.ChildrenStarted(call_id="d1", mode="quorum", quorum=2, children=[
        ev.ChildRecord(session_id="c0", agent="default", task="add 1 and 2"),
        ev.ChildRecord(session_id="c1", agent="checker", task="check it")]),
    ev.ChildSettled(call_id="d1", index=0, session_id="c0", status="done", text="3", input_tokens=10,
                    output_tokens=5, cost_usd=0.001, steps=2),
]


def make_event(payload: ev.Payload, session_id: str = "s1", seq: int = 0, **kw) -> ev.Event:
    fields = dict(
        event_id=ev.random_id(), session_id=session_id, seq=seq, type=payload.TYPE, time=ev.now_ms(),
        causation_id=None, correlation_id=session_id, actor="test",
        schema_version=REGISTRY.latest(payload.TYPE), payload=payload,
    )
    fields.update(kw)
    return ev.Event(**fields)


def goal_events(session_id: str, start: int, n: int) -> list[ev.Event]:
    return [make_event(ev.GoalReceived(text=f"goal {start + i}"), session_id, start + i) for i in range(n)]


def assert_read_like_fastavro(event: ev.Event, data: bytes) -> None:
    """`event`, what `codec.decode` made of `data` (bytes that may be corrupt), is what
    fastavro, the codec of record, reads there, a payload of the class its type names at
    the newest version, and it survives its own round trip: what a wrong decode breaks."""
    try:
        reference = codec._decode_fastavro(data)
    except CodecError as exc:
        raise AssertionError(f"decode accepted bytes that fastavro rejects ({exc}): {event!r}") from None
    assert event == reference
    assert type(event.payload) is ev.PAYLOAD_TYPES[event.type]
    assert event.schema_version == REGISTRY.latest(event.type)
    assert codec.decode(codec.encode(event)) == event


def wait_for(check: Callable[[], Any], timeout: float = 60.0, poll: float = 0.05) -> Any:
    """`check()`'s first true value within `timeout` seconds, else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(poll)
    return None
