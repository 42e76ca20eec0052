"""A session's trace, derived from its log: spans for the session, each step, model call,
tool call, retry backoff, approval wait and compaction, with GenAI semantic-convention
attributes (`gen_ai.*`). Nothing instruments the live loop: the same events always give
the same spans, with ids derived from the session and event ids, so exporting a session
twice sends the same trace (a receiver that keys spans by id keeps one copy).

Pure: no I/O, no OpenTelemetry import (observe/otlp.py turns these records into SDK spans).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loopstream.core import events as ev
from loopstream.core.fsm import ANNOTATIONS

MS = 1_000_000  # ns per ms
Attrs = dict[str, Any]


@dataclass
class SpanEvent:
    name: str
    time_ns: int
    attributes: Attrs = field(default_factory=dict)


@dataclass
class SpanRecord:
    """One span: ids are ints as OpenTelemetry takes them (trace 128 bits, span 64 bits)."""

    name: str
    trace_id: int
    span_id: int
    parent_id: int | None
    start_ns: int
    end_ns: int | None  # None: still open (a live session)
    attributes: Attrs = field(default_factory=dict)
    events: list[SpanEvent] = field(default_factory=list)
    error: str | None = None  # the status description when the span failed
    links: list[tuple[int, int]] = field(default_factory=list)  # (trace id, span id)
    kind: str = "internal"  # internal | client

    @property
    def ended(self) -> bool:
        return self.end_ns is not None


def trace_id(session_id: str) -> int:
    """The trace id of a session: the same session always gives the same trace."""
    return int(hashlib.sha256(f"loopstream-trace\x1f{session_id}".encode()).hexdigest()[:32], 16) or 1


def span_id(session_id: str, key: str) -> int:
    """A span id derived from the session and what the span stands for (an event id)."""
    return int(hashlib.sha256(f"loopstream-span\x1f{session_id}\x1f{key}".encode()).hexdigest()[:16], 16) or 1


def _clip(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else text[:limit] + f"…[{len(text) - limit} more characters]"


class _Builder:
    def __init__(self, session_id: str) -> None:
        self.sid = session_id
        self.tid = trace_id(session_id)
        self.spans: dict[str, SpanRecord] = {}  # key -> span, in the order opened

    def open(self, key: str, name: str, parent: SpanRecord | None, start_ms: int, attrs: Attrs,
             kind: str = "internal") -> SpanRecord:
        span = SpanRecord(name, self.tid, span_id(self.sid, key), parent.span_id if parent else None,
                          start_ms * MS, None, attrs, kind=kind)
        self.spans[key] = span
        return span


def session_spans(events: Sequence[ev.Event]) -> list[SpanRecord]:
    """The spans of one session's events (in seq order, from seq 0). A span whose end is not
    in the log yet (a live session) has `end_ns` None."""
    if not events:
        return []
    first, own = events[0], events[-1]  # a fork by reference begins with its parent's events: its own come last
    b = _Builder(own.session_id)
    root = b.open("session", "invoke_agent", None, first.time, {
        "gen_ai.operation.name": "invoke_agent", "gen_ai.conversation.id": own.session_id,
        "loopstream.session.id": own.session_id, "loopstream.correlation.id": own.correlation_id,
        "openinference.span.kind": "AGENT",
    })
    step: SpanRecord | None = None
    provider = ""
    calls: dict[str, SpanRecord] = {}  # call id -> its open tool span
    approvals: dict[str, SpanRecord] = {}
    requests: dict[str, SpanRecord] = {}  # request id -> its model span
    compaction: SpanRecord | None = None
    tokens_in = tokens_out = 0
    last_ms = first.time

    def close(span: SpanRecord | None, at_ms: int, error: str | None = None) -> None:
        if span is not None and span.end_ns is None:
            span.end_ns = max(span.start_ns, at_ms * MS)
            span.error = error

    def note(name: str, e: ev.Event, attrs: Attrs) -> None:
        (step or root).events.append(SpanEvent(name, e.time * MS, {"loopstream.seq": e.seq, **attrs}))

    for e in events:
        p = e.payload
        if e.type not in ANNOTATIONS:
            last_ms = max(last_ms, e.time)
        match p:
            case ev.SessionStarted():
                provider = p.provider
                root.name = f"invoke_agent {p.agent}"
                root.attributes.update({"gen_ai.agent.name": p.agent, "gen_ai.system": p.provider,
                                        "gen_ai.provider.name": p.provider, "gen_ai.request.model": p.model,
                                        "loopstream.tools": ",".join(p.tools)})
            case ev.GoalReceived():
                root.attributes.setdefault("input.value", _clip(p.text))
                root.attributes.setdefault("loopstream.goal", _clip(p.text))
            case ev.ModelRequested():
                if step is None or step.attributes.get("loopstream.step") != p.step:
                    close(step, e.time)
                    step = b.open(f"step:{e.event_id}", f"step {p.step}", root, e.time, {"loopstream.step": p.step})
                requests[p.request_id] = b.open(e.event_id, f"chat {p.model}", step, e.time, {
                    "gen_ai.operation.name": "chat", "gen_ai.system": provider, "gen_ai.provider.name": provider,
                    "gen_ai.request.model": p.model, "gen_ai.request.id": p.request_id,
                    "loopstream.attempt": p.attempt, "loopstream.seq": e.seq,
                    "openinference.span.kind": "LLM", "llm.model_name": p.model,
                }, kind="client")
            case ev.ModelResponded():
                span = requests.get(p.request_id)
                if span is not None:
                    span.attributes.update({
                        "gen_ai.response.model": p.model, "gen_ai.usage.input_tokens": p.input_tokens,
                        "gen_ai.usage.output_tokens": p.output_tokens,
                        "gen_ai.response.finish_reasons": [p.finish_reason or "stop"],
                        "loopstream.latency_ms": p.latency_ms, "loopstream.action_mode": p.mode,
                        "loopstream.tool_calls": len(p.tool_calls),
                        "llm.token_count.prompt": p.input_tokens, "llm.token_count.completion": p.output_tokens,
                        "llm.token_count.total": p.input_tokens + p.output_tokens,
                        "output.value": _clip(p.text or json.dumps([c.model_dump() for c in p.tool_calls])),
                    })
                    close(span, e.time)
                tokens_in += p.input_tokens
                tokens_out += p.output_tokens
            case ev.ModelFailed():
                span = requests.get(p.request_id)
                if span is not None:
                    span.attributes.update({"error.type": p.error_kind, "loopstream.retryable": p.retryable,
                                            "loopstream.latency_ms": p.latency_ms,
                                            **({"http.response.status_code": p.status} if p.status else {})})
                    close(span, e.time, f"{p.error_kind}: {_clip(p.message, 500)}")
            case ev.RetryScheduled():
                parent = calls.get(p.ref_id) or step or root
                span = b.open(e.event_id, f"retry {p.target}", parent, e.time, {
                    "loopstream.retry.target": p.target, "loopstream.retry.attempt": p.attempt,
                    "loopstream.retry.delay_ms": p.delay_ms, "loopstream.retry.reason": _clip(p.reason, 500),
                    "loopstream.retry.ref": p.ref_id})
                close(span, max(e.time, p.not_before_ms))  # the backoff it waits
            case ev.ModelFallback():
                note("model_fallback", e, {"loopstream.from_model": p.from_model, "loopstream.to_model": p.to_model,
                                           "loopstream.reason": _clip(p.reason, 500)})
            case ev.ToolRequested():
                calls[p.call_id] = b.open(e.event_id, f"execute_tool {p.name}", step or root, e.time, {
                    "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": p.name,
                    "gen_ai.tool.call.id": p.call_id, "gen_ai.tool.type": "function",
                    "loopstream.seq": e.seq, "input.value": _clip(p.arguments_json),
                    "openinference.span.kind": "TOOL", "tool.name": p.name,
                })
            case ev.ToolCompleted():
                span = calls.pop(p.call_id, None)
                if span is not None:
                    span.attributes.update({"loopstream.latency_ms": p.latency_ms, "output.value": _clip(p.result)})
                    close(span, e.time)
            case ev.ToolFailed():
                span = calls.pop(p.call_id, None)
                if span is not None:
                    span.attributes.update({"error.type": p.error_kind, "loopstream.latency_ms": p.latency_ms})
                    close(span, e.time, f"{p.error_kind}: {_clip(p.message, 500)}")
            case ev.GuardrailTripped():
                attrs = {"loopstream.guardrail.stage": p.stage, "loopstream.guardrail.rule": p.rule,
                         "loopstream.guardrail.action": p.action, "loopstream.guardrail.message": _clip(p.message, 500)}
                span = calls.pop(p.call_id, None) if p.call_id else None
                if span is not None:
                    span.events.append(SpanEvent("guardrail", e.time * MS, attrs))
                    close(span, e.time, f"blocked by guardrail {p.rule}")
                else:
                    note("guardrail", e, attrs)
            case ev.ToolCallReviewed():
                target = calls.get(p.call_id)
                (target or step or root).events.append(SpanEvent("tool_call_reviewed", e.time * MS, {
                    "loopstream.review.allowed": p.allowed, "loopstream.review.reason": _clip(p.reason, 500),
                    "gen_ai.request.model": p.model, "gen_ai.usage.input_tokens": p.input_tokens,
                    "gen_ai.usage.output_tokens": p.output_tokens}))
                tokens_in += p.input_tokens
                tokens_out += p.output_tokens
            case ev.ApprovalRequested():
                approvals[p.call_id] = b.open(e.event_id, f"approval {p.name}", calls.get(p.call_id) or step or root,
                                              e.time, {"gen_ai.tool.call.id": p.call_id,
                                                       "loopstream.approval.reason": _clip(p.reason, 500)})
            case ev.ApprovalDecided():
                span = approvals.pop(p.call_id, None)
                if span is not None:
                    span.attributes.update({"loopstream.approval.approved": p.approved,
                                            "loopstream.approval.by": p.by})
                    close(span, e.time)
            case ev.CompactionRequested():
                compaction = b.open(e.event_id, "compaction", step or root, e.time, {
                    "loopstream.compaction.from_seq": p.from_seq, "loopstream.compaction.to_seq": p.to_seq,
                    "loopstream.compaction.estimated_tokens": p.estimated_tokens})
            case ev.ContextCompacted():
                if compaction is not None:
                    compaction.attributes.update({"loopstream.compaction.method": p.method,
                                                  "loopstream.compaction.tokens_before": p.tokens_before,
                                                  "loopstream.compaction.tokens_after": p.tokens_after})
                    close(compaction, e.time)
                    compaction = None
            case ev.LoopDetected():
                note("loop_detected", e, {"loopstream.loop.kind": p.kind, "loopstream.loop.action": p.action,
                                          "loopstream.loop.detail": _clip(p.detail, 500)})
            case ev.ContextOverBudget():
                note("context_over_budget", e, {"loopstream.estimated_tokens": p.estimated_tokens,
                                                "loopstream.budget_tokens": p.budget_tokens})
            case ev.WorkspaceCheckpointed():
                (calls.get(p.call_id) or root).events.append(SpanEvent("workspace_checkpointed", e.time * MS, {
                    "loopstream.commit": p.commit, "loopstream.files_changed": p.files_changed}))
            case ev.SessionForked():
                root.attributes.update({"loopstream.fork.parent_session": p.parent_session_id,
                                        "loopstream.fork.parent_seq": p.parent_seq})
                root.links.append((trace_id(p.parent_session_id), span_id(p.parent_session_id, "session")))
                root.events.append(SpanEvent("session_forked", e.time * MS, {
                    "loopstream.seq": e.seq, "loopstream.fork.reason": _clip(p.reason, 500)}))
            case ev.UserMessage():
                root.events.append(SpanEvent("user_message", e.time * MS, {"loopstream.seq": e.seq}))
            case ev.SessionFinished():
                root.attributes.update({"loopstream.status": "done", "output.value": _clip(p.answer),
                                        "loopstream.steps": p.steps})
            case ev.SessionFailed():
                root.attributes.update({"loopstream.status": "failed", "error.type": p.error_kind})
                root.error = f"{p.error_kind}: {_clip(p.reason, 500)}"
            case ev.SessionCancelled():
                root.attributes["loopstream.status"] = "cancelled"
                root.error = f"cancelled: {_clip(p.reason, 500)}"
            case ev.EvalGraded():
                root.events.append(SpanEvent("eval_graded", e.time * MS, {
                    "loopstream.eval.suite": p.suite, "loopstream.eval.case": p.case_id,
                    "loopstream.eval.variant": p.variant, "loopstream.eval.grader": p.grader,
                    "loopstream.eval.kind": p.kind, "loopstream.eval.passed": p.passed,
                    "loopstream.eval.score": p.score}))
            case ev.FeedbackGiven():
                root.events.append(SpanEvent("feedback", e.time * MS, {
                    "loopstream.feedback.by": p.by, "loopstream.feedback.comment": _clip(p.comment, 1000),
                    **({"loopstream.feedback.score": p.score} if p.score is not None else {})}))
        root.attributes["loopstream.events"] = e.seq + 1
    root.attributes.update({"gen_ai.usage.input_tokens": tokens_in, "gen_ai.usage.output_tokens": tokens_out})
    if "loopstream.status" in root.attributes:  # ended: close what is still open at the end
        error = root.error
        for span in b.spans.values():
            close(span, last_ms, "session ended first" if span is not root and span is not step else None)
        root.error = error
    return list(b.spans.values())
