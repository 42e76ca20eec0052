"""Pydantic models mirroring `schemas/*.avsc` (tests/test_schemas.py proves they agree).

One payload class per event type; `Event` is the envelope around a payload. Payloads
carry only what is new at that step, never a copy of the context, so storage stays linear.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class Payload(BaseModel):
    model_config = ConfigDict(frozen=True)
    TYPE: ClassVar[str]


class SessionStarted(Payload):
    TYPE = "SessionStarted"
    agent: str
    provider: str
    model: str
    system_prompt: str
    tools: list[str]
    max_steps: int
    workdir: str
    config_json: str = "{}"
    # v2: the agent's sampling settings (core/sampling.py), sent on every model call.
    # A v1 event reads them as None/empty; the fold takes the defaults for what is None.
    temperature: float | None = None
    max_output_tokens: int | None = None
    stop: list[str] = []
    top_p: float | None = None
    seed: int | None = None


class GoalReceived(Payload):
    TYPE = "GoalReceived"
    text: str
    idempotency_key: str | None = None
    reply_topic: str | None = None


class ModelRequested(Payload):
    TYPE = "ModelRequested"
    request_id: str
    step: int
    attempt: int
    model: str


class ToolCallRecord(BaseModel):
    model_config = ConfigDict(frozen=True)
    call_id: str
    name: str
    arguments_json: str


class ModelResponded(Payload):
    TYPE = "ModelResponded"
    request_id: str
    text: str
    tool_calls: list[ToolCallRecord]
    input_tokens: int
    output_tokens: int
    latency_ms: int
    finish_reason: str
    mode: str
    model: str


class ModelFailed(Payload):
    TYPE = "ModelFailed"
    request_id: str
    error_kind: str
    message: str
    retryable: bool
    status: int | None = None
    latency_ms: int
    retry_after_ms: int | None = None  # v2


class RetryScheduled(Payload):
    TYPE = "RetryScheduled"
    target: str
    ref_id: str
    attempt: int
    delay_ms: int
    not_before_ms: int
    reason: str


class ModelFallback(Payload):
    TYPE = "ModelFallback"
    from_model: str
    to_model: str
    reason: str


class ToolRequested(Payload):
    TYPE = "ToolRequested"
    call_id: str
    name: str
    arguments_json: str
    step: int


class ToolCompleted(Payload):
    TYPE = "ToolCompleted"
    call_id: str
    name: str
    result: str
    latency_ms: int


class ToolFailed(Payload):
    TYPE = "ToolFailed"
    call_id: str
    name: str
    error_kind: str
    message: str
    latency_ms: int


class SessionFinished(Payload):
    TYPE = "SessionFinished"
    answer: str
    steps: int
    input_tokens: int
    output_tokens: int


class SessionFailed(Payload):
    TYPE = "SessionFailed"
    reason: str
    error_kind: str


class SessionCancelled(Payload):
    TYPE = "SessionCancelled"
    reason: str


class SessionForked(Payload):
    TYPE = "SessionForked"
    parent_session_id: str
    parent_seq: int
    parent_event_hash: str
    reason: str
    overrides_json: str = "{}"
    acknowledged_side_effects_json: str = "[]"


class UserMessage(Payload):
    TYPE = "UserMessage"
    text: str


class CompactionRequested(Payload):
    TYPE = "CompactionRequested"
    request_id: str
    from_seq: int
    to_seq: int
    estimated_tokens: int
    budget_tokens: int


class ContextCompacted(Payload):
    TYPE = "ContextCompacted"
    request_id: str
    from_seq: int
    to_seq: int
    summary: str
    method: str
    tokens_before: int
    tokens_after: int


class WorkspaceCheckpointed(Payload):
    TYPE = "WorkspaceCheckpointed"
    call_id: str
    commit: str
    workdir: str
    files_changed: int


class GuardrailTripped(Payload):
    TYPE = "GuardrailTripped"
    stage: str
    rule: str
    message: str
    action: str
    call_id: str | None = None


class ToolCallReviewed(Payload):
    TYPE = "ToolCallReviewed"
    call_id: str
    allowed: bool
    reason: str
    model: str
    input_tokens: int
    output_tokens: int
    latency_ms: int


class ApprovalRequested(Payload):
    TYPE = "ApprovalRequested"
    call_id: str
    name: str
    arguments_json: str
    reason: str


class ApprovalDecided(Payload):
    TYPE = "ApprovalDecided"
    call_id: str
    approved: bool
    by: str
    reason: str


PAYLOAD_TYPES: dict[str, type[Payload]] = {
    cls.TYPE: cls
    for cls in (
        SessionStarted, GoalReceived, ModelRequested, ModelResponded, ModelFailed,
        RetryScheduled, ModelFallback, CompactionRequested, ContextCompacted,
        GuardrailTripped, ToolCallReviewed, ApprovalRequested, ApprovalDecided,
        ToolRequested, ToolCompleted, ToolFailed, SessionFinished, SessionFailed,
        SessionCancelled, SessionForked, UserMessage, WorkspaceCheckpointed,
    )
}


class Event(BaseModel):
    """The envelope: identity, order, provenance, and one typed payload."""

    model_config = ConfigDict(frozen=True)

    event_id: str
    session_id: str
    seq: int
    type: str
    time: int  # ms since epoch
    causation_id: str | None
    correlation_id: str
    actor: str
    schema_version: int
    payload: Payload
    chain_hash: bytes | None = None  # see schemas/envelope.avsc and codec.seal


def now_ms() -> int:
    return int(time.time() * 1000)


def new_session_id() -> str:
    return uuid.uuid4().hex[:16]


def derived_id(*parts: str) -> str:
    """A deterministic event id: the same causing event and key always give the same id,
    so a retried handler writes the same fact, and the log refuses the second copy."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def random_id() -> str:
    return uuid.uuid4().hex
