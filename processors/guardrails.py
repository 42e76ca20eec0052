"""Guardrails: checks on what goes in, what comes out, and each proposed tool call.

Configured per session (`SessionPolicy.guardrails`, core/policy.py: the `guardrails`
table of a policy file, recorded in the session's SessionStarted):

    [guardrails]
    input_deny = ["(?i)ignore (all|previous) instructions"]   # regexes on the goal / user messages
    output_deny = ["(?i)password"]                              # regexes on the final answer
    output_schema = { type = "object", required = ["answer"] }  # the final answer must be JSON of this schema
                                   # (only for a model told to answer in JSON)
    tool_deny = ["curl .*[|] *sh"]                              # regexes on "tool {json arguments}"
    review_tool_calls = true       # a reviewer model approves each tool call before it runs
    on_output = "tell_model"       # or "stop": what a tripped output check does
    on_tool_call = "tell_model"    # or "stop"

A trip is a GuardrailTripped event. The loop reacts by policy: the model is told (the
fold adds the reason to its context; a blocked tool call settles like a failed one) or
the session stops with SessionFailed.

The reviewer's verdict is a ToolCallReviewed event (model, reason, tokens), recorded before
the call goes on, so a redo after a crash never asks again and replay shows every review;
its tokens count toward the session's budgets. It fails closed: a failed or unreadable
review blocks the call, and so does a tool processor without a reviewer model (a Kafka
tool worker started without --provider/--model), which stops the session since no retry
of the model can help.
"""
from __future__ import annotations

import json
import re
import time

import jsonschema

from loopstream.core import events as ev
from loopstream.core.policy import GuardrailError, Guardrails  # noqa: F401  (re-exported)
from loopstream.providers.actions import loads_lenient
from loopstream.providers.base import Message, ModelReply, Provider, ProviderError, ToolCall

REVIEW_PROMPT = (
    "You review one tool call an AI agent wants to make. Allow it unless it is harmful, "
    "destructive beyond what the goal needs, exfiltrates secrets, or is unrelated to the goal. "
    'Answer with JSON only: {"allow": true|false, "reason": "<one sentence>"}.'
)


def _first_match(patterns: list[str], text: str) -> str | None:
    return next((p for p in patterns if re.search(p, text)), None)


def check_input(cfg: Guardrails, text: str) -> ev.GuardrailTripped | None:
    pattern = _first_match(cfg.input_deny, text)
    if pattern is None:
        return None
    return ev.GuardrailTripped(stage="input", rule=f"input_deny {pattern}", action="stop", call_id=None,
                               message="the input matches a denied pattern")


def check_output(cfg: Guardrails, answer: str) -> ev.GuardrailTripped | None:
    action = cfg.on_output
    pattern = _first_match(cfg.output_deny, answer)
    if pattern is not None:
        return ev.GuardrailTripped(stage="output", rule=f"output_deny {pattern}", action=action, call_id=None,
                                   message="the answer matches a denied pattern; answer again without it")
    schema = cfg.output_schema
    if schema is not None:
        try:
            jsonschema.validate(json.loads(answer), schema)
        except ValueError as exc:  # json.JSONDecodeError and jsonschema.ValidationError are both ValueErrors
            detail = exc.message if isinstance(exc, jsonschema.ValidationError) else f"not JSON ({exc})"
            return ev.GuardrailTripped(stage="output", rule="output_schema", action=action, call_id=None,
                                       message=f"the answer must be JSON matching the required schema: {detail}")
    return None


def check_tool_call(cfg: Guardrails, call: ToolCall) -> ev.GuardrailTripped | None:
    """The pattern checks on a proposed call (pure). The reviewer is separate: its verdict
    is an event of its own (`review`, processors/tools.py)."""
    action = cfg.on_tool_call
    text = f"{call.name} {json.dumps(call.arguments, sort_keys=True)}"
    pattern = _first_match(cfg.tool_deny, text)
    if pattern is not None:
        return ev.GuardrailTripped(stage="tool_call", rule=f"tool_deny {pattern}", action=action,
                                   call_id=call.call_id, message="this tool call matches a denied pattern")
    return None


def no_reviewer(call: ToolCall) -> ev.GuardrailTripped:
    """Fail closed: a review that cannot happen blocks, and stops, since the model cannot fix it."""
    return ev.GuardrailTripped(
        stage="tool_call", rule="reviewer", action="stop", call_id=call.call_id,
        message="the guardrails ask for a review of each tool call, but the tool processor has no "
                "reviewer model (give the tool worker --provider/--model); blocked to be safe")


def reviewer_blocked(cfg: Guardrails, verdict: ev.ToolCallReviewed) -> ev.GuardrailTripped:
    return ev.GuardrailTripped(stage="tool_call", rule="reviewer", action=cfg.on_tool_call,
                               call_id=verdict.call_id, message=f"the reviewer blocked this call: {verdict.reason}")


def review(reviewer: Provider, call: ToolCall, goal: str) -> ev.ToolCallReviewed:
    """Ask the reviewer model; an unreadable or failed review blocks (fail closed)."""
    prompt = [Message(role="system", content=REVIEW_PROMPT),
              Message(role="user", content=f"Goal: {goal}\nTool call: {call.name}({json.dumps(call.arguments)})")]
    started = time.monotonic()

    def verdict(allowed: bool, reason: str, reply: ModelReply | None = None) -> ev.ToolCallReviewed:
        return ev.ToolCallReviewed(
            call_id=call.call_id, allowed=allowed, reason=reason[:300],
            model=(reply.model if reply is not None and reply.model else getattr(reviewer, "model", "")),
            input_tokens=reply.input_tokens if reply else 0, output_tokens=reply.output_tokens if reply else 0,
            latency_ms=int((time.monotonic() - started) * 1000))

    try:
        reply = reviewer.complete(prompt, [])
    except ProviderError as exc:
        return verdict(False, f"the review failed ({exc}); blocked to be safe")
    found = re.search(r"\{.*\}", reply.text or "", re.S)  # small models wrap JSON in prose
    answer = loads_lenient(found.group(0)) if found else None
    if isinstance(answer, dict) and isinstance(answer.get("allow"), bool):
        return verdict(answer["allow"], str(answer.get("reason", "")), reply)
    return verdict(False, f"the reviewer's answer was not a verdict: {reply.text[:120]!r}; blocked to be safe", reply)
