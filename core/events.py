"""Pydantic models mirroring `schemas/*.avsc` (tests/test_schemas.py proves they agree).

One payload class per event type; `Event` is the envelope around a payload. Payloads
carry only what is new at that step, never a copy of the context, so storage stays linear.

An event type is declared once, here: a direct subclass of `Payload` is an event type
named by its class (`TYPE`), registered in `PAYLOAD_TYPES`, its docstring (what it
carries) and `WRITTEN_BY` make its row of the event table in docs/architecture.md.
docs/architecture.md ("Adding an event type") lists what else a new type needs.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class Payload(BaseModel):
    """An event's payload. Each direct subclass is one event type and must say, in its
    docstring, what it carries and, in `WRITTEN_BY`, who writes it."""

    model_config = ConfigDict(frozen=True)
    TYPE: ClassVar[str]  # the event type: the class name (a subclass of a payload keeps its parent's)
    WRITTEN_BY: ClassVar[str]

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if Payload not in cls.__bases__:
            return
        if not cls.__doc__ or not cls.__dict__.get("WRITTEN_BY"):
            raise TypeError(f"event type {cls.__name__}: say what it carries (docstring) and who writes it "
                            "(WRITTEN_BY)")
        cls.TYPE = cls.__name__


class SessionStarted(Payload):
    """Agent, provider, model, system prompt, tool names, step budget, workdir; the sampling
    settings (v2: temperature, output cap, stop sequences, top_p, seed); the agent definition (v3);
    a child session's parent session, parent event and depth (v4)."""
    WRITTEN_BY = "cli / goal intake"
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
    # v3: the agent definition it ran with, as JSON (agents/definition.py); "" for none recorded.
    agent_json: str = ""
    # v4: a child session's link to its parent (docs/subagents.md); None / 0: a top-level session.
    parent_session_id: str | None = None
    parent_event_id: str | None = None
    depth: int = 0


class GoalReceived(Payload):
    """The goal text, idempotency key, reply topic."""
    WRITTEN_BY = "cli / goal intake"
    text: str
    idempotency_key: str | None = None
    reply_topic: str | None = None


class ModelRequested(Payload):
    """Request id (derived from session, step, attempt), step, attempt, model."""
    WRITTEN_BY = "orchestrator"
    request_id: str
    step: int
    attempt: int
    model: str


class ToolCallRecord(BaseModel):
    """One tool call of a model reply (a record inside ModelResponded)."""

    model_config = ConfigDict(frozen=True)
    call_id: str
    name: str
    arguments_json: str


class ModelResponded(Payload):
    """The reply's text and tool calls, tokens, latency, action mode; (v2) the model
    processor's estimate of the prompt it sent and that estimate's tool-spec part."""
    WRITTEN_BY = "model"
    request_id: str
    text: str
    tool_calls: list[ToolCallRecord]
    input_tokens: int
    output_tokens: int
    latency_ms: int
    finish_reason: str
    mode: str
    model: str
    # v2: what the model processor estimated it sent (providers/tokens.py, the whole request)
    # and the part of it from tool specs and action instructions; 0 in v1 events (not measured).
    # With input_tokens (the provider's count) they calibrate the next context estimate.
    estimated_input_tokens: int = 0
    estimated_tool_tokens: int = 0


class ModelFailed(Payload):
    """Error kind, message, retryable, HTTP status, the server's Retry-After (v2)."""
    WRITTEN_BY = "model"
    request_id: str
    error_kind: str
    message: str
    retryable: bool
    status: int | None = None
    latency_ms: int
    retry_after_ms: int | None = None  # v2


class RetryScheduled(Payload):
    """Target (model or tool), which request or call failed, the next attempt, the delay
    (backoff with jitter, or Retry-After)."""
    WRITTEN_BY = "orchestrator (a model call) / tools (a transient failure of an idempotent tool)"
    target: str
    ref_id: str
    attempt: int
    delay_ms: int
    not_before_ms: int
    reason: str


class ModelFallback(Payload):
    """The model given up on, the next model of the fallback chain, why."""
    WRITTEN_BY = "orchestrator"
    from_model: str
    to_model: str
    reason: str


class ToolRequested(Payload):
    """Call id, tool name, JSON arguments."""
    WRITTEN_BY = "orchestrator"
    call_id: str
    name: str
    arguments_json: str
    step: int


class ToolCompleted(Payload):
    """Call id, result text, latency."""
    WRITTEN_BY = "tools"
    call_id: str
    name: str
    result: str
    latency_ms: int


class ToolFailed(Payload):
    """Call id, error kind (unknown_tool, invalid_arguments, tool_exception, …), message."""
    WRITTEN_BY = "tools"
    call_id: str
    name: str
    error_kind: str
    message: str
    latency_ms: int


class CompactionRequested(Payload):
    """The context is over its token budget: the seq range to summarize, the estimate, the
    budget."""
    WRITTEN_BY = "orchestrator"
    request_id: str
    from_seq: int
    to_seq: int
    estimated_tokens: int
    budget_tokens: int


class ContextCompacted(Payload):
    """The range replaced from here on, the summary (model or extractive), tokens
    before/after."""
    WRITTEN_BY = "compaction"
    request_id: str
    from_seq: int
    to_seq: int
    summary: str
    method: str
    tokens_before: int
    tokens_after: int


class ContextOverBudget(Payload):
    """The next request goes out over the context budget, because nothing can be compacted
    now (the kept recent turns are too large, or nothing is new since the last compaction):
    the estimate, the budget, what takes the space."""
    WRITTEN_BY = "orchestrator"
    estimated_tokens: int
    budget_tokens: int
    reason: str


class GuardrailTripped(Payload):
    """Stage, the rule, the message the model is told, action (tell_model or stop). The
    orchestrator's own rules empty_answer and truncated_answer refuse an empty or cap-cut final answer;
    echoed_error and named_tool are its answer checks (processors/answers.py)."""
    WRITTEN_BY = "orchestrator (input, output) / tools (tool calls)"
    stage: str
    rule: str
    message: str
    action: str
    call_id: str | None = None


class ToolCallReviewed(Payload):
    """The reviewer model's verdict on a tool call (guardrails `review_tool_calls`):
    allowed, reason, model, tokens (they count toward the session's), latency; recorded
    before the call goes on, so a redo never asks again."""
    WRITTEN_BY = "tools"
    call_id: str
    allowed: bool
    reason: str
    model: str
    input_tokens: int
    output_tokens: int
    latency_ms: int


class ApprovalRequested(Payload):
    """A permission rule says ask: the call, its arguments, the rule."""
    WRITTEN_BY = "tools"
    call_id: str
    name: str
    arguments_json: str
    reason: str


class ApprovalDecided(Payload):
    """Call id, approved or not, by whom, why."""
    WRITTEN_BY = "a person (`loopstream approve` / `deny`)"
    call_id: str
    approved: bool
    by: str
    reason: str


class SessionFinished(Payload):
    """The final answer, steps, token totals."""
    WRITTEN_BY = "orchestrator"
    answer: str
    steps: int
    input_tokens: int
    output_tokens: int


class SessionFailed(Payload):
    """Reason, error kind."""
    WRITTEN_BY = "orchestrator"
    reason: str
    error_kind: str


class SessionCancelled(Payload):
    """Reason."""
    WRITTEN_BY = "a person"
    reason: str


class SessionForked(Payload):
    """Parent session, parent seq and its chain hash, reason, overrides (model, provider,
    prompt, tools, step budget), the acknowledged side effects."""
    WRITTEN_BY = "a person (`loopstream.replay.fork`)"
    parent_session_id: str
    parent_seq: int
    parent_event_hash: str
    reason: str
    overrides_json: str = "{}"
    acknowledged_side_effects_json: str = "[]"


class UserMessage(Payload):
    """A message added while no model or tool call is owed an answer."""
    WRITTEN_BY = "a person"
    text: str


class WorkspaceCheckpointed(Payload):
    """Before a side-effect tool runs: call id, the commit that snapshots the workdir
    (private git repository `.loopstream/checkpoints`), workdir, files changed since the
    previous checkpoint."""
    WRITTEN_BY = "tools"
    call_id: str
    commit: str
    workdir: str
    files_changed: int


class GoalVerificationRequested(Payload):
    """Goal mode: the model answered; the goal's verify command is to run (in the sandbox):
    iteration (from 1), the command."""
    WRITTEN_BY = "orchestrator"
    iteration: int
    command: str


class GoalVerified(Payload):
    """Goal mode: the verifier's result: iteration, passed (exit code 0), exit code (-1: no
    exit code: timeout, no sandbox), output, latency. A failure goes back to the model."""
    WRITTEN_BY = "verifier"
    iteration: int
    passed: bool
    exit_code: int
    output: str
    latency_ms: int


class GoalPaused(Payload):
    """The session is paused (`loopstream goal pause`): at once between steps, else pending
    until the orchestrator's own GoalPaused at the next step. By whom, why."""
    WRITTEN_BY = "a person (`loopstream goal pause`) / orchestrator (a pending pause takes effect)"
    by: str
    reason: str = ""


class GoalResumed(Payload):
    """A paused session goes on (`loopstream goal resume`), or a pending pause is withdrawn."""
    WRITTEN_BY = "a person (`loopstream goal resume`)"
    by: str
    reason: str = ""


class HookDecided(Payload):
    """A hook's decision (point, hook, call id, allow / deny / ask / error / stop, reason, rewritten
    arguments, a note for the model); recorded before it is acted on, so it never runs twice."""
    WRITTEN_BY = ("tools (PreToolUse, PostToolUse, PermissionRequest, Failure), model (PreModelCall, "
                  "PostModelCall, Failure), compaction (PreCompact), hooks (SessionEnd)")
    point: str
    hook: str
    call_id: str | None = None
    decision: str
    reason: str = ""
    arguments_json: str | None = None
    context: str = ""
    latency_ms: int = 0


class LoopDetected(Payload):
    """The model repeats itself: kind (repeated_call, repeated_reply, oscillation), action
    (tell_model: each call of the reply is answered with the message, which quotes the earlier
    result, instead of running; stop: SessionFailed follows), the calls answered, what repeated."""
    WRITTEN_BY = "orchestrator"
    kind: str
    action: str
    message: str
    call_ids: list[str] = []
    detail: str = ""


class EvalGraded(Payload):
    """An annotation, legal once the session ended: one grader's verdict on it in an eval
    suite (`loopstream eval`): suite, case, variant, trial, grader name and kind, passed,
    score (0..1), detail."""
    WRITTEN_BY = "eval (`loopstream eval`)"
    suite: str
    case_id: str
    variant: str
    trial: int
    grader: str
    kind: str
    passed: bool
    score: float
    detail: str


class FeedbackGiven(Payload):
    """An annotation, legal once the session ended: a person's score and/or comment on it."""
    WRITTEN_BY = "a person (`loopstream feedback`)"
    by: str
    score: float | None = None
    comment: str = ""


class MemoryRecalled(Payload):
    """Memory (`[memory]`): what the agent knew at its start, recorded before its goal: the
    namespace, the query (the goal), the memories found within the token budget (ids) and the
    exact text the model is given, so replay and fork see what the agent knew."""
    WRITTEN_BY = "cli / goal intake (at start)"
    namespace: str
    query: str
    memory_ids: list[str]
    text: str
    tokens: int
    budget_tokens: int


class MemoryRemembered(Payload):
    """Memory: a note kept across sessions (the `remember` tool, or a lesson from feedback): its
    id (derived: a copy or a redo keeps it), namespace, kind (fact or lesson), text, source."""
    WRITTEN_BY = "tools (`remember`) / a person (`loopstream memory learn`)"
    memory_id: str
    namespace: str
    text: str
    kind: str = "fact"
    source: str = ""


class MemoryForgotten(Payload):
    """Memory: a memory forgotten (`loopstream memory forget`), recorded in the session that
    remembered it: its id, namespace, by whom, why."""
    WRITTEN_BY = "a person (`loopstream memory forget`)"
    memory_id: str
    namespace: str
    by: str
    reason: str = ""


# -- sub-agents (docs/subagents.md) ---------------------------------------------------
class ChildRecord(BaseModel):
    """One child of a delegation (a record inside ChildrenStarted)."""

    model_config = ConfigDict(frozen=True)
    session_id: str
    agent: str
    task: str


class ChildrenStarted(Payload):
    """A delegate / spawn_agents call starts child sessions: the call, the aggregation (mode
    all | first | quorum, the quorum), each child in the order asked (session id derived from
    the parent's event, agent, task)."""
    WRITTEN_BY = "delegation (processors/delegation.py, for the tools)"
    call_id: str
    mode: str
    quorum: int
    children: list[ChildRecord]


class ChildSettled(Payload):
    """A child of a delegation ended or is no longer needed: call, index, session, status
    (done | failed | cancelled), answer or error, tokens (counted toward the parent's
    budgets), cost, steps. The last one is followed by the call's ToolCompleted."""
    WRITTEN_BY = "children (runtime/children.py)"
    call_id: str
    index: int
    session_id: str
    status: str
    text: str
    input_tokens: int
    output_tokens: int
    cost_usd: float | None = None
    steps: int = 0


# Every event type, by name, in the order declared above.
PAYLOAD_TYPES: dict[str, type[Payload]] = {cls.TYPE: cls for cls in Payload.__subclasses__()}


def events_table() -> str:
    """The event table of docs/architecture.md: one row per event type, from its class."""
    rows = ["| event | written by | carries |", "|---|---|---|"]
    for name, cls in PAYLOAD_TYPES.items():
        rows.append(f"| {name} | {cls.WRITTEN_BY} | {' '.join((cls.__doc__ or '').split())} |")
    return "\n".join(rows)


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
