"""One-line, human-readable summaries of events: the one summary per payload that `show`,
progress, `replay` and `diff` print."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from loopstream.core import events as ev
from loopstream.core.fsm import STATES, TERMINAL, TRANSITIONS


def short(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


def call_text(name: str, arguments_json: str) -> str:
    """A tool call as `name(a=1, b='x')` (its JSON arguments as written, if not an object)."""
    try:
        args = json.loads(arguments_json)
    except ValueError:
        return f"{name}({arguments_json})"
    if isinstance(args, dict):
        return f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"
    return f"{name}({arguments_json})"


def _forked(p: ev.SessionForked) -> str:
    text = f"fork of {p.parent_session_id} at seq {p.parent_seq} ({p.parent_event_hash[:12]})"
    try:
        over, acked = json.loads(p.overrides_json or "{}"), json.loads(p.acknowledged_side_effects_json or "[]")
    except ValueError:
        over, acked = {"overrides": p.overrides_json}, []
    if over and isinstance(over, dict):
        text += " overrides " + ", ".join(f"{k}={short(repr(v), 40)}" for k, v in over.items())
    if acked and isinstance(acked, list):
        text += f"; {len(acked)} side effect(s) acknowledged"
    return text + (f"; reason {p.reason!r}" if p.reason else "")


def _sampling(p: ev.SessionStarted) -> str:
    """The recorded sampling settings (a v1 event may leave them to the server: not shown)."""
    parts = [f"temp={p.temperature:g}" if p.temperature is not None else "",
             f"max_out={p.max_output_tokens}" if p.max_output_tokens is not None else "",
             f"stop={','.join(map(repr, p.stop))}" if p.stop else "", f"top_p={p.top_p:g}" if p.top_p is not None else "",
             f"seed={p.seed}" if p.seed is not None else ""]
    return "".join(" " + x for x in parts if x)


def _sandbox(p: ev.SessionStarted) -> str:
    """The sandbox a session with a code tool recorded (policy.to_config_json), else nothing."""
    if '"sandbox"' not in p.config_json:
        return ""
    try:
        box = json.loads(p.config_json).get("sandbox", {})
    except ValueError:
        return ""
    return f" sandbox={box.get('mode', '?')}{'+network' if box.get('network') else ''}" if "mode" in box else ""


def _responded(p: ev.ModelResponded) -> str:
    calls = "; ".join(call_text(c.name, c.arguments_json) for c in p.tool_calls)
    body = f"calls {calls}" if calls else f"says {p.text!r}"
    return f"{body} ({p.input_tokens}+{p.output_tokens} tok, {p.latency_ms} ms, {p.mode})"


# One summary per event type; tests/test_describe.py checks that every type has its own.
SUMMARIES: dict[type[ev.Payload], Callable[[Any], str]] = {
    ev.SessionStarted: lambda p: (f"agent={p.agent} provider={p.provider} model={p.model}{_sandbox(p)}{_sampling(p)} "
                                  f"tools={','.join(p.tools) or '-'} max_steps={p.max_steps}"),
    ev.GoalReceived: lambda p: repr(p.text),
    ev.ModelRequested: lambda p: f"step {p.step}" + (f" attempt {p.attempt}" if p.attempt > 1 else "")
                                 + f" model={p.model}",
    ev.ModelResponded: _responded,
    ev.ModelFailed: lambda p: f"{p.error_kind}: {p.message}" + (" (retryable)" if p.retryable else ""),
    ev.RetryScheduled: lambda p: f"{p.target} attempt {p.attempt} in {p.delay_ms} ms ({p.reason})",
    ev.ModelFallback: lambda p: f"{p.from_model} → {p.to_model} ({p.reason})",
    ev.ToolRequested: lambda p: call_text(p.name, p.arguments_json),
    ev.ToolCompleted: lambda p: f"{p.name} → {p.result!r} ({p.latency_ms} ms)",
    ev.ToolFailed: lambda p: f"{p.name} {p.error_kind}: {p.message}",
    ev.CompactionRequested: lambda p: (f"events {p.from_seq}-{p.to_seq} (~{p.estimated_tokens} tok "
                                       f"> budget {p.budget_tokens})"),
    ev.ContextCompacted: lambda p: (f"events {p.from_seq}-{p.to_seq} → {p.method} summary "
                                    f"({p.tokens_before} → {p.tokens_after} tok)"),
    ev.ContextOverBudget: lambda p: f"~{p.estimated_tokens} tok > budget {p.budget_tokens}: {p.reason}",
    ev.GuardrailTripped: lambda p: f"{p.stage} {p.action}: {p.message} [{p.rule}]"
                                   + (f" call {p.call_id}" if p.call_id else ""),
    ev.HookDecided: lambda p: (f"{p.point} hook {p.hook!r}" + (f" on {p.call_id}" if p.call_id else "")
                               + f": {p.decision}" + (f" ({p.reason})" if p.reason else "")
                               + (f" args={p.arguments_json}" if p.arguments_json else "")
                               + (f" note={p.context!r}" if p.context else "")),
    ev.LoopDetected: lambda p: f"{p.kind} {p.action}: {p.detail}"
                               + (f" ({', '.join(p.call_ids)})" if p.call_ids else ""),
    ev.ToolCallReviewed: lambda p: (f"{'allowed' if p.allowed else 'BLOCKED'} {p.call_id} by {p.model}: "
                                    f"{p.reason} ({p.input_tokens}+{p.output_tokens} tok, {p.latency_ms} ms)"),
    ev.ApprovalRequested: lambda p: (f"{call_text(p.name, p.arguments_json)} waits for a person ({p.reason}); "
                                     f"call {p.call_id}"),
    ev.ApprovalDecided: lambda p: f"{'approved' if p.approved else 'denied'} {p.call_id} by {p.by}"
                                  + (f": {p.reason}" if p.reason else ""),
    ev.SessionFinished: lambda p: (f"answer {p.answer!r} after {p.steps} steps "
                                   f"({p.input_tokens}+{p.output_tokens} tok)"),
    ev.SessionFailed: lambda p: f"{p.error_kind}: {p.reason}",
    ev.SessionCancelled: lambda p: p.reason,
    ev.SessionForked: _forked,
    ev.UserMessage: lambda p: repr(p.text),
    ev.GoalVerificationRequested: lambda p: f"iteration {p.iteration}: verify with {p.command!r}",
    ev.GoalVerified: lambda p: (f"iteration {p.iteration}: {'PASSED' if p.passed else 'FAILED'} "
                                f"(exit code {p.exit_code}, {p.latency_ms} ms) "
                                f"{(p.output.strip().splitlines() or [''])[-1][-200:]!r}"),  # the last line says most
    ev.GoalPaused: lambda p: f"by {p.by}" + (f": {p.reason}" if p.reason else ""),
    ev.GoalResumed: lambda p: f"by {p.by}" + (f": {p.reason}" if p.reason else ""),
    ev.EvalGraded: lambda p: (f"{'PASS' if p.passed else 'FAIL'} {p.suite}/{p.case_id}"
                              + (f" [{p.variant}]" if p.variant else "") + f" trial {p.trial} "
                              f"{p.kind}:{p.grader} score {p.score:g}" + (f": {p.detail}" if p.detail else "")),
    ev.FeedbackGiven: lambda p: (f"by {p.by}" + (f" score {p.score:g}" if p.score is not None else "")
                                 + (f": {p.comment!r}" if p.comment else "")),
    ev.WorkspaceCheckpointed: lambda p: (f"call {p.call_id}: workdir {p.workdir} at {p.commit[:12]} "
                                         f"({p.files_changed} files changed)"),
    ev.MemoryRecalled: lambda p: (f"{len(p.memory_ids)} memories of {p.namespace} "
                                  f"(~{p.tokens}/{p.budget_tokens} tokens)"),
    ev.MemoryRemembered: lambda p: f"{p.kind} {p.memory_id} in {p.namespace}: {p.text!r}",
    ev.MemoryForgotten: lambda p: f"{p.memory_id} in {p.namespace} by {p.by}" + (f": {p.reason}" if p.reason else ""),
    ev.ChildrenStarted: lambda p: (f"call {p.call_id}: {len(p.children)} child(ren), mode {p.mode}"
                                   + (f" quorum {p.quorum}" if p.mode == "quorum" else "") + ": "
                                   + "; ".join(f"{c.session_id} ({c.agent}) {c.task[:80]!r}" for c in p.children)),
    ev.ChildSettled: lambda p: (f"call {p.call_id} child {p.index} {p.session_id} {p.status}: {p.text[:200]!r} "
                                f"({p.input_tokens}+{p.output_tokens} tok"
                                + (f", ${p.cost_usd:.4f}" if p.cost_usd is not None else "") + ")"),
}


def summary(payload: ev.Payload) -> str:
    """What `payload` says, on one line, untruncated (a type without a summary: its fields)."""
    for cls in type(payload).__mro__:  # a newer version of a payload (a subclass) reads like its parent
        fn = SUMMARIES.get(cls)
        if fn is not None:
            return fn(payload)
    return ", ".join(f"{k}={v!r}" for k, v in payload.model_dump().items())


def summarize(event: ev.Event, width: int = 80) -> str:
    """`summary` of the event's payload, cut to `width` characters."""
    return short(summary(event.payload), width)


def _status_by_last_type() -> dict[str, str]:
    """The event types whose every row in the table ends in one state that a list of sessions
    shows as such: an ended session, or one waiting for a person."""
    dests: dict[str, set[str]] = {}
    for trigger, _, dest, _ in TRANSITIONS:
        dests.setdefault(trigger, set()).add(dest)
    shown = set(TERMINAL) | {row.status for row in STATES if row.owed_by == "person"}
    by_type = {t: next(iter(d)).replace("_", " ") for t, d in dests.items() if len(d) == 1 and d <= shown}
    return {**by_type, "GoalPaused": "paused"}  # paused, or pausing after the call in flight


STATUS_BY_LAST_TYPE = _status_by_last_type()


def status_of(last_type: str) -> str:
    """A session's status as a list shows it, from the type of its last event."""
    return STATUS_BY_LAST_TYPE.get(last_type, "running")
