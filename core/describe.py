"""One-line, human-readable summaries of events (for `show`, progress and replay)."""
from __future__ import annotations

import json

from loopstream.core import events as ev


def short(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _call(name: str, arguments_json: str) -> str:
    try:
        args = json.loads(arguments_json)
        inner = ", ".join(f"{k}={v!r}" for k, v in args.items()) if isinstance(args, dict) else arguments_json
    except ValueError:
        inner = arguments_json
    return f"{name}({inner})"


def _sampling(p: ev.SessionStarted) -> str:
    """The recorded sampling settings (a v1 event may leave them to the server: not shown)."""
    parts = [f"temp={p.temperature:g}" if p.temperature is not None else "",
             f"max_out={p.max_output_tokens}" if p.max_output_tokens is not None else "",
             f"stop={','.join(map(repr, p.stop))}" if p.stop else "", f"top_p={p.top_p:g}" if p.top_p is not None else "",
             f"seed={p.seed}" if p.seed is not None else ""]
    return "".join(" " + x for x in parts if x)


def summarize(event: ev.Event, width: int = 80) -> str:
    p = event.payload
    match p:
        case ev.SessionStarted():
            s = f"agent={p.agent} provider={p.provider} model={p.model}{_sampling(p)} tools={','.join(p.tools)}"
        case ev.GoalReceived():
            s = repr(p.text)
        case ev.ModelRequested():
            s = f"step {p.step}" + (f" attempt {p.attempt}" if p.attempt > 1 else "") + f" model={p.model}"
        case ev.ModelResponded():
            calls = "; ".join(_call(c.name, c.arguments_json) for c in p.tool_calls)
            body = f"calls {calls}" if calls else f"says {p.text!r}"
            s = f"{body} ({p.input_tokens}+{p.output_tokens} tok, {p.latency_ms} ms, {p.mode})"
        case ev.ModelFailed():
            s = f"{p.error_kind}: {p.message}" + (" (retryable)" if p.retryable else "")
        case ev.RetryScheduled():
            s = f"{p.target} attempt {p.attempt} in {p.delay_ms} ms ({p.reason})"
        case ev.ModelFallback():
            s = f"{p.from_model} → {p.to_model} ({p.reason})"
        case ev.CompactionRequested():
            s = f"events {p.from_seq}-{p.to_seq} (~{p.estimated_tokens} tok > budget {p.budget_tokens})"
        case ev.ContextCompacted():
            s = f"events {p.from_seq}-{p.to_seq} → {p.method} summary ({p.tokens_before} → {p.tokens_after} tok)"
        case ev.GuardrailTripped():
            s = f"{p.stage} {p.action}: {p.message} [{p.rule}]"
        case ev.ToolCallReviewed():
            s = (f"{'allowed' if p.allowed else 'blocked'} {p.call_id} by {p.model}: {p.reason} "
                 f"({p.input_tokens}+{p.output_tokens} tok, {p.latency_ms} ms)")
        case ev.ApprovalRequested():
            s = f"{_call(p.name, p.arguments_json)} waits for a person ({p.reason}); call {p.call_id}"
        case ev.ApprovalDecided():
            s = f"{'approved' if p.approved else 'denied'} {p.call_id} by {p.by}" + (f": {p.reason}" if p.reason else "")
        case ev.ToolRequested():
            s = _call(p.name, p.arguments_json)
        case ev.ToolCompleted():
            s = f"{p.name} → {p.result!r} ({p.latency_ms} ms)"
        case ev.ToolFailed():
            s = f"{p.name} {p.error_kind}: {p.message}"
        case ev.SessionFinished():
            s = f"answer {p.answer!r} after {p.steps} steps ({p.input_tokens}+{p.output_tokens} tok)"
        case ev.SessionFailed():
            s = f"{p.error_kind}: {p.reason}"
        case ev.SessionCancelled():
            s = p.reason
        case _:
            s = short(json.dumps(p.model_dump(), default=str), width)
    return short(s, width)


STATUS_BY_LAST_TYPE = {
    "SessionFinished": "done",
    "SessionFailed": "failed",
    "SessionCancelled": "cancelled",
    "ApprovalRequested": "awaiting approval",
}


def status_of(last_type: str) -> str:
    return STATUS_BY_LAST_TYPE.get(last_type, "running")
