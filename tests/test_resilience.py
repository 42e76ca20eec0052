"""Retries with backoff and Retry-After, fallback models, and budgets — each an event."""
from __future__ import annotations

import io
import time

import pytest
from fastavro import schemaless_writer

from loopstream.core import events as ev
from loopstream.core.codec import REGISTRY, decode, encode
from loopstream.core.policy import Retries
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from loopstream.processors.model import ModelProcessor
from loopstream.processors.orchestrator import Orchestrator
from loopstream.processors.retry import backoff_ms, retry_delay_ms
from loopstream.processors.tools import ToolProcessor
from loopstream.providers.base import ModelReply, ProviderError, ToolCall
from loopstream.providers.scripted import ScriptedProvider, adder_script
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import Runtime, SessionConfig
from loopstream.tools import default_registry
from tests.helpers import make_event


@pytest.fixture
def log(tmp_path):
    with SQLiteLog(tmp_path / "r.db") as log:
        yield log


def cfg(**policy) -> SessionConfig:
    policy.setdefault("retries", {"base_ms": 10})
    return SessionConfig(provider="scripted", model="primary", tools=["add"], policy=policy)


def failing_then(n_failures: int, error: ProviderError, reply: ModelReply):
    calls = {"n": 0, "times": []}

    def script(messages):
        calls["n"] += 1
        calls["times"].append(time.monotonic())
        if calls["n"] <= n_failures:
            raise error
        return reply

    return script, calls


def test_429_twice_then_success_finishes_with_two_retry_events_honouring_retry_after(log) -> None:
    script, calls = failing_then(2, ProviderError("rate limited", retryable=True, status=429, retry_after=0.2,
                                                  kind="rate_limit"), ModelReply(text="done"))
    rt = build_runtime(log, ScriptedProvider(script, model="primary"))
    state = rt.run_session(rt.start_session("x", cfg()))
    assert state.status == "done" and state.answer == "done"
    events = log.read(state.session_id)
    retries = [e.payload for e in events if e.type == "RetryScheduled"]
    failures = [e.payload for e in events if e.type == "ModelFailed"]
    assert len(retries) == 2 and len(failures) == 2
    assert [r.delay_ms for r in retries] == [200, 200] and [f.retry_after_ms for f in failures] == [200, 200]
    assert [r.attempt for r in retries] == [2, 3]
    # The runtime really waited: each retry ran no earlier than the server asked.
    assert calls["times"][1] - calls["times"][0] >= 0.19 and calls["times"][2] - calls["times"][1] >= 0.19
    assert [e.payload.attempt for e in events if e.type == "ModelRequested"] == [1, 2, 3]


def test_non_retryable_error_is_not_retried(log) -> None:
    script, calls = failing_then(5, ProviderError("bad key", retryable=False, status=401, kind="auth"),
                                 ModelReply(text="never"))
    rt = build_runtime(log, ScriptedProvider(script, model="primary"))
    state = rt.run_session(rt.start_session("x", cfg()))
    assert state.status == "failed" and calls["n"] == 1
    assert state.error == "model failed: primary failed 1 time(s); last error: bad key"


def test_retry_after_longer_than_allowed_fails_with_the_reason(log) -> None:
    script, _ = failing_then(5, ProviderError("slow down", retryable=True, status=429, retry_after=3600),
                             ModelReply(text="never"))
    rt = build_runtime(log, ScriptedProvider(script, model="primary"))
    state = rt.run_session(rt.start_session("x", cfg()))
    assert state.status == "failed" and "asked to wait 3600s, longer than allowed" in state.error


def test_fallback_chain_switches_model_and_records_it(log) -> None:
    down = ScriptedProvider([ProviderError("overloaded", retryable=True, status=529)], model="primary")
    backup = ScriptedProvider([ModelReply(text="from backup")], model="backup")
    registry = default_registry()
    rt = Runtime(log, [Orchestrator(), ModelProcessor(down, registry.specs(), fallbacks=[backup]),
                       ToolProcessor(registry)])
    state = rt.run_session(rt.start_session("x", cfg(fallback_models=["backup"], retries={"base_ms": 10, "max_model_attempts": 2})))
    assert state.status == "done" and state.answer == "from backup" and state.model == "backup"
    types = [e.type for e in log.read(state.session_id)]
    assert types.count("ModelFailed") == 2 and types.count("RetryScheduled") == 1
    (fb,) = [e.payload for e in log.read(state.session_id) if e.type == "ModelFallback"]
    assert (fb.from_model, fb.to_model) == ("primary", "backup") and "overloaded" in fb.reason
    responded = [e.payload for e in log.read(state.session_id) if e.type == "ModelResponded"]
    assert responded[0].model == "backup"


@pytest.mark.parametrize(("budgets", "kind", "text"), [
    ({"max_tokens": 40}, "budget_tokens", "token budget exceeded: the last reply brought the session to"),
    ({"max_cost_usd": 0.0001, "price_per_mtok": {"input": 1000, "output": 1000}}, "budget_cost", "cost budget exceeded"),
])
def test_budgets_end_the_session_with_a_reason_event(log, budgets, kind, text) -> None:
    rt = build_runtime(log, ScriptedProvider(adder_script(50)))
    state = rt.run_session(rt.start_session("x", SessionConfig(provider="scripted", model="s", tools=["add"],
                                                               max_steps=100, policy={"budgets": budgets})))
    assert state.status == "failed"
    last = log.read(state.session_id)[-1]
    assert last.type == "SessionFailed" and last.payload.error_kind == kind and text in last.payload.reason


def test_wall_time_budget(log) -> None:
    def slow(messages):
        time.sleep(0.3)
        return adder_script(50)(messages)

    rt = build_runtime(log, ScriptedProvider(slow))
    state = rt.run_session(rt.start_session("x", SessionConfig(provider="scripted", model="s", tools=["add"],
                                                               max_steps=100, policy={"budgets": {"max_wall_seconds": 0.5}})))
    assert state.status == "failed" and state.error.startswith("time budget ")  # exhausted, or exceeded by a reply


def test_a_final_answer_that_went_past_the_token_budget_is_not_success(log) -> None:
    """The reply that pushed the session over its token budget ends it failed, naming the
    budget, even though it was a final answer (before: `done`, exit 0)."""
    rt = build_runtime(log, ScriptedProvider([ModelReply(text="42", input_tokens=90_000, output_tokens=10_000)]))
    state = rt.run_session(rt.start_session("x", SessionConfig(provider="scripted", model="s", tools=["add"],
                                                               policy={"budgets": {"max_tokens": 1000}})))
    assert state.status == "failed" and state.answer is None
    last = log.read(state.session_id)[-1]
    assert last.type == "SessionFailed" and last.payload.error_kind == "budget_tokens"
    assert "100000 of 1000 tokens" in last.payload.reason
    assert [e.type for e in log.read(state.session_id)][-2:] == ["ModelResponded", "SessionFailed"]


def test_a_reply_that_came_after_the_time_budget_fails_the_session(log) -> None:
    def slow_answer(messages):
        time.sleep(0.6)
        return ModelReply(text="42")

    rt = build_runtime(log, ScriptedProvider(slow_answer))
    state = rt.run_session(rt.start_session("x", SessionConfig(provider="scripted", model="s", tools=[],
                                                               policy={"budgets": {"max_wall_seconds": 0.3}})))
    assert state.status == "failed" and state.error.startswith("time budget exceeded: the last reply came")
    assert log.read(state.session_id)[-1].payload.error_kind == "budget_time"


def test_a_reply_within_its_budgets_still_finishes(log) -> None:
    rt = build_runtime(log, ScriptedProvider([ModelReply(text="42", input_tokens=600, output_tokens=400)]))
    state = rt.run_session(rt.start_session("x", SessionConfig(provider="scripted", model="s", tools=[],
                                                               policy={"budgets": {"max_tokens": 1000}})))
    assert state.status == "done" and state.answer == "42"


def test_backoff_is_exponential_jittered_capped_and_deterministic() -> None:
    delays = [backoff_ms(a, "req", base_ms=100, max_ms=1000) for a in range(2, 8)]
    assert delays == [backoff_ms(a, "req", base_ms=100, max_ms=1000) for a in range(2, 8)]
    for attempt, d in zip(range(2, 8), delays):
        step = min(1000, 100 * 2 ** (attempt - 2))
        assert step / 2 <= d <= step
    assert backoff_ms(3, "a", base_ms=100) != backoff_ms(3, "b", base_ms=100)
    assert retry_delay_ms(2, "r", 1500, Retries()) == 1500
    assert retry_delay_ms(2, "r", 10**9, Retries()) is None


def test_model_failed_v1_events_still_decode_under_v2() -> None:
    """Schema evolution: a v1 ModelFailed (no retry_after_ms) read by current code."""
    v1 = REGISTRY.versions["ModelFailed"][1]
    buf = io.BytesIO()
    schemaless_writer(buf, v1, {"request_id": "r", "error_kind": "k", "message": "m", "retryable": True,
                                "status": None, "latency_ms": 3})
    modern = make_event(ev.ModelFailed(request_id="r", error_kind="k", message="m", retryable=True, latency_ms=3))
    envelope = {**modern.model_dump(exclude={"payload"}), "schema_version": 1, "payload": buf.getvalue()}
    out = io.BytesIO()
    schemaless_writer(out, REGISTRY.envelope, envelope)
    back = decode(out.getvalue())
    assert back.payload == modern.payload and back.payload.retry_after_ms is None
    assert decode(encode(modern)) == modern


def test_fold_is_unchanged_by_where_it_starts(log) -> None:
    rt = build_runtime(log, ScriptedProvider(adder_script(3)))
    state = rt.run_session(rt.start_session("x", cfg()))
    events = log.read(state.session_id)
    for cut in range(len(events)):
        assert fold(events[cut:], fold(events[:cut])) == state


def test_a_tool_that_overruns_its_timeout_fails_and_the_loop_goes_on(log) -> None:
    from loopstream.tools import tool

    @tool(timeout_s=0.2)
    def sleepy(seconds: float) -> str:
        """Sleeps."""
        time.sleep(seconds)
        return "woke"

    provider = ScriptedProvider([ModelReply(tool_calls=[ToolCall(call_id="1", name="sleepy", arguments={"seconds": 2})]),
                                 ModelReply(text="gave up waiting")])
    rt = build_runtime(log, provider, default_registry().add(sleepy))
    started = time.monotonic()
    state = rt.run_session(rt.start_session("x", SessionConfig(
        provider="scripted", model="s", tools=["sleepy"], policy={"retries": {"base_ms": 20, "max_tool_attempts": 2}})))
    assert state.status == "done" and time.monotonic() - started < 2.0
    events = log.read(state.session_id)
    # An idempotent tool's timeout is retried (max_tool_attempts=2), then reported.
    assert [e.payload.target for e in events if e.type == "RetryScheduled"] == ["tool"]
    (failed,) = [e.payload for e in events if e.type == "ToolFailed"]
    assert failed.error_kind == "timeout" and "within 0.2s" in failed.message


def test_transient_tool_failures_are_retried_with_backoff(log) -> None:
    from loopstream.tools import ToolError, tool

    calls = {"flaky": 0, "once": 0}

    @tool
    def flaky(x: int) -> str:
        """Fails twice, then works."""
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise ToolError("upstream busy", kind="transient")
        return str(x * 2)

    @tool(idempotent=False)
    def once(x: int) -> str:
        """Not idempotent: never retried."""
        calls["once"] += 1
        raise ToolError("upstream busy", kind="transient")

    provider = ScriptedProvider([
        ModelReply(tool_calls=[ToolCall(call_id="1", name="flaky", arguments={"x": 21}),
                               ToolCall(call_id="2", name="once", arguments={"x": 1})]),
        ModelReply(text="done")])
    rt = build_runtime(log, provider, default_registry().add(flaky, once))
    state = rt.run_session(rt.start_session("x", SessionConfig(provider="scripted", model="s", tools=["flaky", "once"],
                                                               policy={"retries": {"base_ms": 40}})))
    assert state.status == "done" and calls == {"flaky": 3, "once": 1}
    events = log.read(state.session_id)
    retries = [e.payload for e in events if e.type == "RetryScheduled"]
    assert [(r.target, r.attempt) for r in retries] == [("tool", 2), ("tool", 3)]
    assert all(r.ref_id.endswith(".1") and "upstream busy" in r.reason and 20 <= r.delay_ms <= 80 for r in retries)
    (done,) = [e.payload for e in events if e.type == "ToolCompleted"]
    (failed,) = [e.payload for e in events if e.type == "ToolFailed"]
    assert done.result == "42" and failed.name == "once" and failed.error_kind == "transient"


def test_rate_limiter_spreads_requests_and_tokens() -> None:
    from loopstream.providers.ratelimit import RateLimiter

    now = [0.0]
    waits = []
    limiter = RateLimiter(requests_per_minute=60, tokens_per_minute=600,
                          clock=lambda: now[0], sleep=lambda s: (waits.append(s), now.__setitem__(0, now[0] + s)))
    for _ in range(60):
        assert limiter.acquire(5) == 0.0  # a full bucket: a burst of 60 requests passes at once
    assert limiter.acquire(5) == pytest.approx(1.0)  # then one per second
    assert waits == [pytest.approx(1.0)]
    tokens = RateLimiter(tokens_per_minute=600, clock=lambda: now[0],
                         sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert tokens.acquire(600) == 0.0
    assert tokens.acquire(100) == pytest.approx(10.0)  # 10 tokens per second come back
    tokens.settle(estimated=100, actual=40)  # the call used less: give 60 back
    assert tokens.tokens.level == pytest.approx(60.0)


def test_model_processor_waits_for_the_rate_limiter(log) -> None:
    from loopstream.providers.ratelimit import RateLimiter

    started = time.monotonic()
    limiter = RateLimiter(requests_per_minute=600)  # 10 per second once the burst is used
    limiter.requests.level = 0
    rt = build_runtime(log, ScriptedProvider(adder_script(3)), limits={"scripted": limiter})
    state = rt.run_session(rt.start_session("x", cfg()))
    # 4 model calls from an empty bucket: at least 0.4 s after the limiter was made, however
    # fast or loaded the machine (time spent elsewhere refills the bucket, so it waits less).
    assert state.status == "done" and limiter.waited > 0 and time.monotonic() - started >= 0.39
