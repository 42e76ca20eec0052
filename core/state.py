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
from loopstream.core.construct import factory
from loopstream.core.conversation import Message, MessageList, ToolCall
from loopstream.core.fsm import CONDITIONAL_ONLY, LEGAL, UNCONDITIONAL, IllegalTransition, next_state, owed_by
from loopstream.core.policy import SessionPolicy, recorded_policy
from loopstream.core.sampling import Sampling, recorded, sampling_from


@dataclass(slots=True)
class PendingCall:
    """One tool call of the session that has no result yet: everything the loop knows about it."""

    call: ToolCall
    owed_seq: int  # the event its next step is owed from: ToolRequested, or the latest that carries it on
    checkpoint_seq: int | None = None  # its WorkspaceCheckpointed: from there on the tool counts as started
    attempt: int = 1  # the attempt now scheduled (a transient failure's RetryScheduled adds one)
    retry_at_ms: int | None = None  # not before this time: a retry's backoff
    review: bool | None = None  # the reviewer model's verdict (ToolCallReviewed), once given
    approval: str | None = None  # why a person must decide, while they have not (ApprovalRequested)
    approved: bool | None = None  # the person's decision (ApprovalDecided)
    hooked: bool = False  # its PreToolUse hooks have decided (HookDecided)

    def copy(self) -> PendingCall:
        return PendingCall(self.call, self.owed_seq, self.checkpoint_seq, self.attempt, self.retry_at_ms,
                           self.review, self.approval, self.approved, self.hooked)


@dataclass(frozen=True, slots=True)
class Delegation:
    """A delegate / spawn_agents call whose children have not all been reported (docs/subagents.md):
    its ChildrenStarted, the event its work is owed from (that or the latest ChildSettled), and
    the children settled so far. Replaced, never mutated."""

    call_id: str
    started_seq: int
    started_id: str  # the ChildrenStarted event's id: the children's parent_event_id
    owed_seq: int
    mode: str
    quorum: int
    children: tuple[ev.ChildRecord, ...]
    settled: tuple[ev.ChildSettled, ...] = ()


@dataclass(frozen=True, slots=True)
class Owed:
    """An event whose handling is still owed, and by whom (`core.fsm.owed_by`, refined per call)."""

    seq: int
    actor: str  # "orchestrator" | "model" | "compaction" | "tools" | "person"
    not_before_ms: int | None = None  # not due before this time (a retry's backoff)

    def due(self, now_ms: int) -> bool:
        return self.not_before_ms is None or now_ms >= self.not_before_ms


@dataclass(slots=True)  # slots: the fold sets a dozen attributes per event
class SessionState:
    session_id: str = ""
    status: str = "new"
    seq: int = -1  # seq of the last applied event
    last_event_id: str | None = None
    correlation_id: str = ""
    agent: str = ""
    agent_json: str = ""  # the agent definition it ran with (SessionStarted v3; agents/definition.py)
    provider: str = ""
    model: str = ""
    tools: list[str] = field(default_factory=list)
    max_steps: int = 0
    workdir: str = ""
    policy: SessionPolicy = field(default_factory=SessionPolicy)  # typed, read-only; recorded in SessionStarted
    sampling: Sampling = field(default_factory=Sampling)  # sent on every model call (SessionStarted v2)
    goal: str = ""
    messages: MessageList = field(default_factory=MessageList)  # a copy shares it (O(1))
    step: int = 0  # model requests made (a retry does not count as a new step)
    attempt: int = 0  # attempt number of the current step's model request
    consecutive_model_failures: int = 0  # on the current model; reset by a reply or a fallback
    last_model_error: str = ""
    last_model_retryable: bool = True
    last_retry_after_ms: int | None = None
    last_failed_request_id: str = ""
    step_open: bool = False  # a step's model request has not been answered yet
    retry_not_before_ms: int | None = None
    fallbacks_used: list[str] = field(default_factory=list)
    open_request_id: str | None = None
    open_request_seq: int | None = None
    last_reply_text: str = ""
    last_finish_reason: str = ""  # why the last reply ended ("length": it hit the output cap)
    # call id -> (arguments_json, parsed call) of the last reply's tool calls, in order: the
    # ToolRequested events that repeat a call reuse it instead of parsing the JSON again.
    # Replaced, never mutated.
    last_reply_parsed: dict[str, tuple[str, ToolCall]] = field(default_factory=dict)
    pending_calls: dict[str, PendingCall] = field(default_factory=dict)  # call id -> its record, until it settles
    guardrail_trips: int = 0
    # Loop detection (policy `loops`, processors/loops.py): the last `loops.window` replies as
    # (seq, signature), the calls they made as (seq, call signature, call id), and how many times
    # the model was told. Tuples, replaced and never mutated: a clone shares them.
    recent_replies: tuple[tuple[int, str], ...] = ()
    recent_calls: tuple[tuple[int, str, str], ...] = ()
    loop_nudges: int = 0
    long_results: int = 0  # tool results of LONG_RESULT_CHARS or more: shaping looks at the context only if any
    unfinished_answers: int = 0  # replies refused as final answers: empty, or cut at the output cap
    answer_nudges: int = 0  # final answers refused by the answer checks (policy `answers`)
    tool_calls: int = 0
    tool_errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    answer: str | None = None
    error: str | None = None
    started_ms: int = 0
    updated_ms: int = 0
    open_compaction_id: str | None = None
    open_compaction_seq: int | None = None
    compactions: int = 0
    last_compaction_seq: int | None = None  # the last ContextCompacted: a context is compacted again only once it grew
    # What the last measured reply says about the context's size (ModelResponded v2;
    # processors/context.py calibrates the next estimate with it): the provider's count of
    # the prompt, the model processor's estimate of it, its part from tool specs and action
    # instructions, and the action mode the adapter wrote it in.
    last_input_tokens: int = 0
    last_input_estimate: int = 0  # 0: not measured (a v1 reply, or none yet)
    tool_tokens: int = 0
    action_mode: str = "native"
    chain_head: bytes | None = None  # chain_hash of the last applied event (codec.seal links the next)
    requested_tools: tuple[str, ...] = ()  # every tool name a ToolRequested named, in order of first use
    rewrites: int = 0  # times `messages` was changed other than by appending (compaction, a fork's prompt)
    # goal mode ([goal] verify_command): verifications so far, the last result, a pause asked for
    goal_iterations: int = 0
    goal_passed: bool = False  # the last verification passed (the answer it checked is final)
    last_verification: str = ""  # "passed" | "failed: exit code N" (for status and progress)
    open_verification_seq: int | None = None
    pause_pending: bool = False
    paused_by: str = ""
    # hooks at the model, compaction and end points (HookDecided; processors/hooks.py)
    model_hooked: bool = False  # the open model request's PreModelCall hooks have decided
    open_compaction: ev.CompactionRequested | None = None  # the open request (its range and budget)
    compaction_hooked: bool = False  # its PreCompact hooks have decided
    compaction_note: str = ""  # what they asked the summary to keep
    end_hooks_owed: bool = False  # ended with SessionEnd hooks that have not decided yet
    end_seq: int | None = None  # the event that ended the session
    # sub-agents (docs/subagents.md): this session's place in a tree, and its open delegations
    parent_session_id: str | None = None
    parent_event_id: str | None = None
    depth: int = 0
    delegations: dict[str, Delegation] = field(default_factory=dict)  # call id -> open delegation; replaced
    children_started: int = 0  # child sessions this session started, over its life

    @property
    def last_reply_calls(self) -> list[ToolCall]:
        """The tool calls of the model's last reply, in order."""
        return [call for _, call in self.last_reply_parsed.values()]

    @property
    def next_seq(self) -> int:
        return self.seq + 1

    @property
    def open_approvals(self) -> dict[str, str]:
        """call id -> why a person must decide, for the calls waiting for a person."""
        return {c: p.approval for c, p in self.pending_calls.items() if p.approval is not None}

    @property
    def terminal(self) -> bool:
        return self.status in ("done", "failed", "cancelled")


# GuardrailTripped rules of the orchestrator's own check on a final answer (not a policy's
# guardrails): the reply was empty, or cut at the output cap. The model is told and answers again.
UNFINISHED_ANSWER_RULES = frozenset({"empty_answer", "truncated_answer"})
# ... and of its answer checks (policy `answers`, processors/answers.py): the model is told why.
ANSWER_CHECK_RULES = frozenset({"echoed_error", "named_tool"})
# How a failed tool call's result reads in the conversation: "ERROR (kind): message".
ERROR_RESULT_PREFIX = "ERROR ("


# A tool result this long is worth shaping (processors/shaping.py): sent once if repeated,
# windowed if longer than the policy allows.
LONG_RESULT_CHARS = 200


class SequenceGap(ValueError):
    pass


Transition = Callable[[SessionState, str, int | None], str]


def apply(state: SessionState, event: ev.Event, transition: Transition = next_state) -> SessionState:
    """Apply one event. Mutates and returns `state` (use `fold` for a fresh one).

    `transition` answers where the FSM goes; the default, `fsm.next_state`, is the lookup
    read off the one `transitions` machine (the live check before an append is the same)."""
    if event.seq != state.seq + 1:
        raise SequenceGap(
            f"session {event.session_id}: expected seq {state.seq + 1}, got {event.seq}"
        )
    key = (state.status, event.type)
    if key not in LEGAL:  # reject before touching anything
        raise IllegalTransition(state.status, event.type, event.seq)
    if key in CONDITIONAL_ONLY and transition is not _payload_only:  # every row's condition may fail:
        transition(apply(clone(state), event, _payload_only), event.type, event.seq)  # ask on a copy first
    p = event.payload
    match p:  # the most frequent events first: a case is an isinstance check
        case ev.ModelRequested():
            if p.step != state.step:
                state.step, state.attempt = p.step, 0
            state.attempt = p.attempt
            state.open_request_id = p.request_id
            state.open_request_seq = event.seq
            state.step_open = True
            state.retry_not_before_ms = None
            state.model_hooked = False
        case ev.ModelResponded():
            calls = [_tool_call(c.call_id, c.name, c.arguments_json) for c in p.tool_calls]
            state.messages.append(_message("assistant", p.text, event.seq, tool_calls=calls))
            state.last_reply_text = p.text
            state.last_finish_reason = p.finish_reason
            state.last_reply_parsed = {
                c.call_id: (r.arguments_json, c) for r, c in zip(p.tool_calls, calls, strict=True)
            }
            state.input_tokens += p.input_tokens
            state.output_tokens += p.output_tokens
            if p.estimated_input_tokens:
                state.last_input_tokens, state.last_input_estimate = p.input_tokens, p.estimated_input_tokens
                state.tool_tokens, state.action_mode = p.estimated_tool_tokens, p.mode
            state.consecutive_model_failures = 0
            state.step_open = False
            state.open_request_id = state.open_request_seq = None
            if state.policy.loops.enabled:
                _remember_reply(state, event.seq, p.text, calls)
        case ev.ToolRequested():
            known = state.last_reply_parsed.get(p.call_id)
            if known is None or known[0] != p.arguments_json or known[1].name != p.name:
                known = (p.arguments_json, _tool_call(p.call_id, p.name, p.arguments_json))
            state.pending_calls[p.call_id] = PendingCall(known[1], event.seq)
            state.tool_calls += 1
            if p.name not in state.requested_tools:
                state.requested_tools += (p.name,)
        case ev.ToolCompleted():
            state.pending_calls.pop(p.call_id, None)
            if p.call_id in state.delegations:
                state.delegations = {c: d for c, d in state.delegations.items() if c != p.call_id}
            if len(p.result) >= LONG_RESULT_CHARS:
                state.long_results += 1
            state.messages.append(_message("tool", p.result, event.seq, tool_call_id=p.call_id, name=p.name))
        case ev.SessionStarted():
            state.session_id = event.session_id
            state.correlation_id = event.correlation_id
            state.started_ms = event.time
            state.agent, state.provider, state.model = p.agent, p.provider, p.model
            state.agent_json = p.agent_json
            state.parent_session_id, state.parent_event_id, state.depth = p.parent_session_id, p.parent_event_id, p.depth
            state.tools, state.max_steps, state.workdir = list(p.tools), p.max_steps, p.workdir
            state.policy = recorded_policy(p.config_json)
            state.sampling = recorded(p.temperature, p.max_output_tokens, p.stop, p.top_p, p.seed)
            if p.system_prompt:
                state.messages.append(_message("system", p.system_prompt, event.seq))
        case ev.MemoryRecalled() if p.text:  # what the agent knows from earlier sessions, before its goal
            state.messages.append(_message("system", p.text, event.seq))
        case ev.GoalReceived():
            state.goal = state.goal or p.text
            state.messages.append(_message("user", p.text, event.seq))
        case ev.ModelFailed():
            state.consecutive_model_failures += 1
            state.last_model_error = p.message
            state.last_model_retryable = p.retryable
            state.last_retry_after_ms = p.retry_after_ms
            state.last_failed_request_id = p.request_id
            state.open_request_id = state.open_request_seq = None
        case ev.RetryScheduled() if p.target == "tool":
            if (rec := state.pending_calls.get(p.ref_id)) is not None:  # the tool processor retries from here
                rec.owed_seq, rec.attempt, rec.retry_at_ms = event.seq, p.attempt, p.not_before_ms
                rec.checkpoint_seq = None  # a retry checkpoints again before it runs
        case ev.RetryScheduled():
            state.retry_not_before_ms = p.not_before_ms
        case ev.ModelFallback():
            state.fallbacks_used.append(p.to_model)
            state.model = p.to_model
            state.consecutive_model_failures = 0
        case ev.ToolFailed():
            state.pending_calls.pop(p.call_id, None)
            if p.call_id in state.delegations:
                state.delegations = {c: d for c, d in state.delegations.items() if c != p.call_id}
            state.tool_errors += 1
            state.messages.append(_message("tool", f"{ERROR_RESULT_PREFIX}{p.error_kind}): {p.message}", event.seq,
                                           tool_call_id=p.call_id, name=p.name))
        case ev.CompactionRequested():
            state.open_compaction_id = p.request_id
            state.open_compaction_seq = event.seq
            state.open_compaction, state.compaction_hooked, state.compaction_note = p, False, ""
        case ev.ContextCompacted():
            state.messages = MessageList(compacted(state.messages, p.from_seq, p.to_seq, p.summary))
            state.rewrites += 1
            state.compactions += 1
            state.last_compaction_seq = event.seq
            state.open_compaction_id = state.open_compaction_seq = state.open_compaction = None
        case ev.GuardrailTripped() if p.rule in UNFINISHED_ANSWER_RULES:
            state.unfinished_answers += 1  # the orchestrator's check, not a configured guardrail
            if p.action == "tell_model":
                state.messages.append(_message("user", p.message, event.seq))
        case ev.GuardrailTripped() if p.rule in ANSWER_CHECK_RULES:
            state.answer_nudges += 1  # the orchestrator's answer checks, not a configured guardrail
            state.messages.append(_message("user", p.message, event.seq))
        case ev.GuardrailTripped():
            state.guardrail_trips += 1
            note = f"BLOCKED by guardrail ({p.rule}): {p.message}"
            if p.call_id is not None and p.call_id in state.pending_calls:
                name = state.pending_calls.pop(p.call_id).call.name
                state.messages.append(_message("tool", note, event.seq, tool_call_id=p.call_id, name=name))
            elif p.stage == "output" and p.action == "tell_model":
                state.messages.append(_message("user", note, event.seq))
        case ev.LoopDetected():
            if p.action == "tell_model":  # each call of the reply is answered with the note; none runs
                state.loop_nudges += 1
                for call_id in p.call_ids:
                    known = state.last_reply_parsed.get(call_id)
                    state.messages.append(_message("tool", p.message, event.seq, tool_call_id=call_id,
                                                   name=known[1].name if known else None))
        case ev.ToolCallReviewed():
            state.input_tokens += p.input_tokens  # a review is model use: it counts toward the budgets
            state.output_tokens += p.output_tokens
            if (rec := state.pending_calls.get(p.call_id)) is not None:
                rec.review = p.allowed
                if p.allowed:
                    rec.owed_seq = event.seq  # the tool processor carries on from here
        case ev.HookDecided() if p.point == "PreToolUse":
            if p.call_id is not None and (rec := state.pending_calls.get(p.call_id)) is not None:
                rec.owed_seq, rec.hooked = event.seq, True  # the tool processor carries on from here
                if p.arguments_json is not None:  # the hook rewrote the arguments
                    rec.call = _tool_call(p.call_id, rec.call.name, p.arguments_json)
        case ev.HookDecided():
            _hook_decided(state, p, event.seq)
        case ev.ApprovalRequested():
            if (rec := state.pending_calls.get(p.call_id)) is not None:
                rec.approval, rec.owed_seq = p.reason, event.seq  # owed by a person from here
        case ev.ApprovalDecided():
            if (rec := state.pending_calls.get(p.call_id)) is not None:
                rec.approval, rec.approved, rec.owed_seq = None, p.approved, event.seq  # the tools act on it
        case ev.SessionFinished():
            state.answer = p.answer
            _ended(state, event.seq)
        case ev.SessionFailed():
            state.error = p.reason
            _ended(state, event.seq)
        case ev.SessionCancelled():
            state.error = p.reason
            _ended(state, event.seq)
        case ev.SessionForked():  # from here on the events are the child's (a fork by reference
            state.session_id = event.session_id  # inherits its parent's events as they are)
            state.correlation_id = event.correlation_id
            _apply_overrides(state, json.loads(p.overrides_json or "{}"))
        case ev.UserMessage():
            state.messages.append(_message("user", p.text, event.seq))
        case ev.WorkspaceCheckpointed():
            if (rec := state.pending_calls.get(p.call_id)) is not None:  # the tool runs right after it
                rec.owed_seq = rec.checkpoint_seq = event.seq
                rec.retry_at_ms = None
        case ev.GoalVerificationRequested():
            state.goal_iterations = p.iteration
            state.open_verification_seq = event.seq
            state.goal_passed = False
        case ev.GoalVerified():
            state.open_verification_seq = None
            state.goal_passed = p.passed
            state.last_verification = "passed" if p.passed else f"failed: exit code {p.exit_code}"
            if not p.passed:
                state.messages.append(_message("user", verifier_feedback(p), event.seq))
        case ev.GoalPaused():
            state.pause_pending = state.status not in ("planning", "backing_off")  # else: paused now
            state.paused_by = p.by if p.by != "orchestrator" else state.paused_by
        case ev.GoalResumed():
            state.pause_pending = False
            state.paused_by = ""
        case ev.ChildrenStarted():
            state.delegations = {**state.delegations, p.call_id: Delegation(
                p.call_id, event.seq, event.event_id, event.seq, p.mode, p.quorum, tuple(p.children))}
            state.children_started += len(p.children)
        case ev.ChildSettled():
            state.input_tokens += p.input_tokens  # a child's model use counts toward the parent's budgets
            state.output_tokens += p.output_tokens
            if (d := state.delegations.get(p.call_id)) is not None:
                state.delegations = {**state.delegations, p.call_id: dataclasses.replace(
                    d, owed_seq=event.seq, settled=(*d.settled, p))}
    # The transition is checked after the payload is applied: conditions such as
    # "tools_settled" look at what this event changed.
    fixed = UNCONDITIONAL.get(key) if transition is next_state else None  # most rows need no condition
    state.status = fixed if fixed is not None else transition(state, event.type, event.seq)
    state.seq = event.seq
    state.last_event_id = event.event_id
    state.updated_ms = event.time
    state.chain_head = event.chain_hash
    return state


def _ended(state: SessionState, seq: int) -> None:
    """The session ended: its SessionEnd hooks are owed (to the hooks processor) if it has any."""
    state.end_seq = seq
    state.end_hooks_owed = any(h.event == "SessionEnd" for h in state.policy.hooks)


def _hook_decided(state: SessionState, p: ev.HookDecided, seq: int) -> None:
    """A hook's decision at a point other than PreToolUse: who carries on from it."""
    if p.point == "PermissionRequest" and p.decision == "allow":  # approved for a person: the call runs
        if p.call_id is not None and (rec := state.pending_calls.get(p.call_id)) is not None:
            rec.owed_seq, rec.approved = seq, True
    elif p.point == "PreModelCall" and state.open_request_seq is not None:
        state.open_request_seq, state.model_hooked = seq, True  # the model processor calls from here
        if p.context:
            state.messages.append(_message("user", f"[PreModelCall hook {p.hook}: {p.context}]", seq))
    elif p.point == "PreCompact" and state.open_compaction_seq is not None:
        state.open_compaction_seq, state.compaction_hooked = seq, True  # the compaction processor goes on
        if p.context:
            state.compaction_note = (state.compaction_note + "\n" + p.context).strip()
    elif p.point == "SessionEnd":
        state.end_hooks_owed = False


def verifier_feedback(p: ev.GoalVerified) -> str:
    """The message the model reads after a failed verification."""
    how = f"exit code {p.exit_code}" if p.exit_code >= 0 else "it did not complete"
    return (f"The goal is not reached yet: its verification (iteration {p.iteration}) failed ({how}). "
            f"Verifier output:\n{p.output or '(none)'}\nKeep working on the goal, then answer again.")


def call_signature(call: ToolCall) -> str:
    """A tool call's name and arguments, canonical: two calls with the same signature are the same call."""
    return f"{call.name}\x00{json.dumps(call.arguments, sort_keys=True, ensure_ascii=False)}"


def _remember_reply(state: SessionState, seq: int, text: str, calls: list[ToolCall]) -> None:
    """Keep the reply's signature and its calls' for loop detection, within the window."""
    signatures = [call_signature(c) for c in calls]
    replies = (*state.recent_replies, (seq, text.strip() + "\x01" + "\x02".join(signatures)))
    replies = replies[-state.policy.loops.window:]
    oldest = replies[0][0]
    state.recent_replies = replies
    state.recent_calls = (*(c for c in state.recent_calls if c[0] >= oldest),
                          *((seq, sig, call.call_id) for sig, call in zip(signatures, calls)))


def _payload_only(state: SessionState, event_type: str, seq: int | None) -> str:
    """A transition that stays put: `apply` with it applies only the payload."""
    return state.status


def _apply_overrides(state: SessionState, overrides: dict) -> None:
    """A fork's changes to what the session runs with; they take effect from its next step."""
    if "model" in overrides:
        state.model = overrides["model"]
    if "provider" in overrides:
        state.provider = overrides["provider"]
    if "tools" in overrides:
        state.tools = list(overrides["tools"])
    if "max_steps" in overrides:
        state.max_steps = int(overrides["max_steps"])
    if "sampling" in overrides:  # the changed settings only; the rest stay as recorded
        state.sampling = sampling_from(overrides["sampling"], state.sampling, "fork overrides")
    if "system_prompt" in overrides:  # replaces the system message in place (same seq)
        state.rewrites += 1
        has_system = bool(state.messages) and state.messages[0].role == "system"
        prompt = overrides["system_prompt"]
        if has_system and prompt:
            state.messages[0] = Message(role="system", content=prompt, seq=state.messages[0].seq)
        elif has_system:
            del state.messages[0]
        elif prompt:
            state.messages.insert(0, Message(role="system", content=prompt, seq=0))


def summary_message(summary: str, from_seq: int, to_seq: int) -> Message:
    """How a compacted range appears to the model; its seq is the range's start, so the
    messages stay in seq order and a later compaction can include this summary."""
    return Message(role="user", content=f"[Summary of earlier steps, events {from_seq}-{to_seq}]\n{summary}",
                   seq=from_seq)


def compacted(messages: list[Message], from_seq: int, to_seq: int, summary: str) -> list[Message]:
    """`messages` with those from seq `from_seq` to `to_seq` replaced by one summary."""
    before = [m for m in messages if m.seq is None or m.seq < from_seq]
    after = [m for m in messages if m.seq is not None and m.seq > to_seq]
    return before + [summary_message(summary, from_seq, to_seq)] + after


_FIELDS = tuple(f.name for f in dataclasses.fields(SessionState))
# The fields `apply` mutates in place (the others it replaces): copied one level deep.
_COPIED = {"messages": "s.messages.copy()",  # O(1) for a MessageList (a plain list assigned by a caller: copied)
           "fallbacks_used": "list(s.fallbacks_used)",
           "pending_calls": "{c: p.copy() for c, p in s.pending_calls.items()}"}


def _clone_function() -> Callable[[SessionState], SessionState]:
    """`clone`, generated with one plain attribute copy per field: a straight line of
    stores costs a third of a loop of setattr calls, and every write folds a clone."""
    body = "\n".join(f"    n.{f} = {_COPIED.get(f, f's.{f}')}" for f in _FIELDS)
    namespace = {"SessionState": SessionState, "new": object.__new__}
    exec(f"def clone(s):\n    n = new(SessionState)\n{body}\n    return n\n", namespace)
    return namespace["clone"]


_clone = _clone_function()


def clone(state: SessionState) -> SessionState:
    """A copy `apply` can mutate without touching `state` (messages share one buffer, see MessageList;
    fields the fold replaces rather than mutates are shared too)."""
    return _clone(state)


def fold(
    events: Iterable[ev.Event], state: SessionState | None = None, transition: Transition = next_state
) -> SessionState:
    """Fold events onto a copy of `state` (or onto a new session)."""
    out = clone(state) if state is not None else SessionState()
    for event in events:
        apply(out, event, transition)
    return out


def open_work(state: SessionState) -> list[Owed]:
    """The events whose handling is still owed, and by whom: what a driver dispatches next
    (and what a restarted one redoes). The FSM table says who owes each state
    (`core.fsm.owed_by`); this adds which event:

    - orchestrator (planning, acting, backing_off): the head of the log; backing off, not
      before the retry's time;
    - model / compaction: the open ModelRequested / CompactionRequested;
    - tools / person / children (awaiting_tools, awaiting_approval, awaiting_children): one
      item per pending call, owed by the children runner while it is a delegation whose
      children are not all reported (from its ChildrenStarted or latest ChildSettled), else from
      the event its next step is owed from (`PendingCall.owed_seq`): owed by a person while
      its approval is open, by the tools otherwise (not before a retry's time). Calls whose
      workspace checkpoint is taken come first: a side-effect tool runs right after its own
      checkpoint, so each checkpoint holds the workspace exactly as the events before it left it;
    - hooks: an ended session's SessionEnd hooks, from the event that ended it, until they decided.
    """
    actor = owed_by(state.status)
    if actor is None and state.end_hooks_owed:  # ended: its SessionEnd hooks have not run yet
        return [Owed(state.end_seq, "hooks")]
    if actor == "orchestrator":
        return [Owed(state.seq, actor, state.retry_not_before_ms if state.status == "backing_off" else None)]
    if actor == "model" and state.open_request_seq is not None:
        return [Owed(state.open_request_seq, actor)]
    if actor == "compaction" and state.open_compaction_seq is not None:
        return [Owed(state.open_compaction_seq, actor)]
    if actor == "verifier" and state.open_verification_seq is not None:
        return [Owed(state.open_verification_seq, actor)]
    if actor in ("tools", "person", "children"):
        calls = sorted(state.pending_calls.values(), key=lambda p: (p.checkpoint_seq is None, p.owed_seq))
        delegations = state.delegations
        return [Owed(delegations[p.call.call_id].owed_seq, "children") if p.call.call_id in delegations
                else Owed(p.owed_seq, "person") if p.approval is not None else Owed(p.owed_seq, "tools", p.retry_at_ms)
                for p in calls]
    return []


def _message(role: str, content: str, seq: int, *, tool_calls: list[ToolCall] | None = None,
             tool_call_id: str | None = None, name: str | None = None) -> Message:
    """A conversation message from a decoded event: trusted values, built without validation."""
    return _new_message({"role": role, "content": content, "tool_calls": [] if tool_calls is None else tool_calls,
                         "tool_call_id": tool_call_id, "name": name, "seq": seq})


def _tool_call(call_id: str, name: str, arguments_json: str) -> ToolCall:
    return _new_tool_call({"call_id": call_id, "name": name, "arguments": _args(arguments_json)})


# Every field given, every time: tests/test_construct.py checks these build what validation would.
_new_message = factory(Message)
_new_tool_call = factory(ToolCall)


# The decoder's scanner without json.loads' wrapper (type checks, two whitespace regexes):
# a quarter of the time for the short JSON of tool arguments, which we write ourselves
# with json.dumps. Anything it does not take whole goes through json.loads.
_scan_json = json.JSONDecoder().scan_once


def _args(arguments_json: str) -> dict:
    try:
        value, end = _scan_json(arguments_json, 0)
        if end != len(arguments_json):
            raise ValueError("trailing text")
    except (StopIteration, ValueError):
        try:
            value = json.loads(arguments_json)
        except ValueError:
            return {"_raw": arguments_json}
    return value if isinstance(value, dict) else {"_value": value}
