"""A session's state as a pure fold over its events: `state = apply(state, event)`.

No I/O here. The fold rebuilds the conversation (`messages`) from the events that
carry each new piece, so a replay reaches the same state without calling anything.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from loopstream.core import events as ev
from loopstream.core.fsm import check_legal, next_state
from loopstream.providers.base import Message, ToolCall


@dataclass
class SessionState:
    session_id: str = ""
    status: str = "new"
    seq: int = -1  # seq of the last applied event
    last_event_id: str | None = None
    correlation_id: str = ""
    agent: str = ""
    provider: str = ""
    model: str = ""
    tools: list[str] = field(default_factory=list)
    max_steps: int = 0
    workdir: str = ""
    config: dict = field(default_factory=dict)
    goal: str = ""
    messages: list[Message] = field(default_factory=list)
    step: int = 0  # model requests made (a retry does not count as a new step)
    attempt: int = 0  # attempt number of the current step's model request
    consecutive_model_failures: int = 0  # on the current model; reset by a reply or a fallback
    last_model_error: str = ""
    last_model_retryable: bool = True
    last_retry_after_ms: int | None = None
    last_failed_request_id: str = ""
    step_open: bool = False  # a step's model request has not been answered yet
    retry_scheduled: bool = False  # the current failure already has its RetryScheduled
    retry_not_before_ms: int | None = None
    fallbacks_used: list[str] = field(default_factory=list)
    open_request_id: str | None = None
    open_request_seq: int | None = None
    last_reply_calls: list[ToolCall] = field(default_factory=list)
    last_reply_text: str = ""
    pending_calls: dict[str, ToolCall] = field(default_factory=dict)
    pending_call_seqs: dict[str, int] = field(default_factory=dict)
    tool_calls: int = 0
    tool_errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    answer: str | None = None
    error: str | None = None
    started_ms: int = 0
    updated_ms: int = 0

    @property
    def next_seq(self) -> int:
        return self.seq + 1

    @property
    def wake_at_ms(self) -> int | None:
        """When a session that is waiting on the clock (backing off) can move again."""
        return self.retry_not_before_ms if self.status == "backing_off" else None

    @property
    def terminal(self) -> bool:
        return self.status in ("done", "failed", "cancelled")


class SequenceGap(ValueError):
    pass


Transition = Callable[[SessionState, str, int | None], str]


def apply(state: SessionState, event: ev.Event, transition: Transition = next_state) -> SessionState:
    """Apply one event. Mutates and returns `state` (use `fold` for a fresh one).

    `transition` answers where the FSM goes; the default is the compiled table, the
    runtime passes the `transitions` machine when it checks events before appending."""
    if event.seq != state.seq + 1:
        raise SequenceGap(
            f"session {event.session_id}: expected seq {state.seq + 1}, got {event.seq}"
        )
    check_legal(state.status, event.type, event.seq)
    p = event.payload
    match p:
        case ev.SessionStarted():
            state.session_id = event.session_id
            state.correlation_id = event.correlation_id
            state.started_ms = event.time
            state.agent, state.provider, state.model = p.agent, p.provider, p.model
            state.tools, state.max_steps, state.workdir = list(p.tools), p.max_steps, p.workdir
            state.config = json.loads(p.config_json or "{}")
            if p.system_prompt:
                state.messages.append(Message(role="system", content=p.system_prompt))
        case ev.GoalReceived():
            state.goal = state.goal or p.text
            state.messages.append(Message(role="user", content=p.text))
        case ev.ModelRequested():
            if p.step != state.step:
                state.step, state.attempt = p.step, 0
            state.attempt = p.attempt
            state.open_request_id = p.request_id
            state.open_request_seq = event.seq
            state.step_open = True
            state.retry_scheduled, state.retry_not_before_ms = False, None
        case ev.ModelResponded():
            calls = [
                ToolCall(call_id=c.call_id, name=c.name, arguments=_args(c.arguments_json))
                for c in p.tool_calls
            ]
            state.messages.append(Message(role="assistant", content=p.text, tool_calls=calls))
            state.last_reply_calls, state.last_reply_text = calls, p.text
            state.input_tokens += p.input_tokens
            state.output_tokens += p.output_tokens
            state.consecutive_model_failures = 0
            state.step_open = False
            state.open_request_id = state.open_request_seq = None
        case ev.ModelFailed():
            state.consecutive_model_failures += 1
            state.last_model_error = p.message
            state.last_model_retryable = p.retryable
            state.last_retry_after_ms = p.retry_after_ms
            state.last_failed_request_id = p.request_id
            state.open_request_id = state.open_request_seq = None
        case ev.RetryScheduled():
            state.retry_scheduled = True
            state.retry_not_before_ms = p.not_before_ms
        case ev.ModelFallback():
            state.fallbacks_used.append(p.to_model)
            state.model = p.to_model
            state.consecutive_model_failures = 0
        case ev.ToolRequested():
            state.pending_calls[p.call_id] = ToolCall(
                call_id=p.call_id, name=p.name, arguments=_args(p.arguments_json)
            )
            state.pending_call_seqs[p.call_id] = event.seq
            state.tool_calls += 1
        case ev.ToolCompleted():
            state.pending_calls.pop(p.call_id, None)
            state.pending_call_seqs.pop(p.call_id, None)
            state.messages.append(
                Message(role="tool", content=p.result, tool_call_id=p.call_id, name=p.name)
            )
        case ev.ToolFailed():
            state.pending_calls.pop(p.call_id, None)
            state.pending_call_seqs.pop(p.call_id, None)
            state.tool_errors += 1
            state.messages.append(
                Message(
                    role="tool",
                    content=f"ERROR ({p.error_kind}): {p.message}",
                    tool_call_id=p.call_id,
                    name=p.name,
                )
            )
        case ev.SessionFinished():
            state.answer = p.answer
        case ev.SessionFailed():
            state.error = p.reason
        case ev.SessionCancelled():
            state.error = p.reason
    # The transition is checked after the payload is applied: conditions such as
    # "tools_settled" look at what this event changed.
    state.status = transition(state, event.type, event.seq)
    state.seq = event.seq
    state.last_event_id = event.event_id
    state.updated_ms = event.time
    return state


def clone(state: SessionState) -> SessionState:
    """A copy `apply` can mutate without touching `state` (messages are shared, never mutated)."""
    return dataclasses.replace(
        state,
        messages=list(state.messages),
        pending_calls=dict(state.pending_calls),
        pending_call_seqs=dict(state.pending_call_seqs),
        fallbacks_used=list(state.fallbacks_used),
    )


def fold(
    events: Iterable[ev.Event], state: SessionState | None = None, transition: Transition = next_state
) -> SessionState:
    """Fold events onto a copy of `state` (or onto a new session)."""
    out = clone(state) if state is not None else SessionState()
    for event in events:
        apply(out, event, transition)
    return out


def open_work(state: SessionState) -> list[int]:
    """Seqs of the events whose handling is still owed: what a restarted runtime redoes.

    planning/acting: the orchestrator must decide from the latest event; awaiting_model:
    the open ModelRequested; awaiting_tools: each ToolRequested without a result.
    """
    if state.status in ("planning", "acting", "backing_off"):
        return [state.seq]
    if state.status == "awaiting_model" and state.open_request_seq is not None:
        return [state.open_request_seq]
    if state.status == "awaiting_tools":
        return sorted(state.pending_call_seqs.values())
    return []


def _args(arguments_json: str) -> dict:
    try:
        value = json.loads(arguments_json)
    except ValueError:
        return {"_raw": arguments_json}
    return value if isinstance(value, dict) else {"_value": value}
