"""The tool processor: ToolRequested → run the tool → ToolCompleted | ToolFailed.

Unknown tools, invalid arguments and exceptions inside a tool all become ToolFailed
events the model reads on its next step; none of them stops the loop.

Before a call runs it passes a gate: guardrails (deny patterns, an optional reviewer
model whose verdict is recorded as ToolCallReviewed before the call goes on) may block
it (GuardrailTripped), and permission rules may deny it (ToolFailed permission_denied)
or ask a person (ApprovalRequested; the session waits in awaiting_approval until an
ApprovalDecided, written by `loopstream approve` / `deny`). A call outside the session's
`[scope]` (tools/scope.py) is ToolFailed `scope_denied` naming the rule, before anything runs.

A side-effect tool (`read_only=False`) runs right after its WorkspaceCheckpointed is in the
log: the processor snapshots the workspace and emits that event with the run attached
(`Emit.then`), and the writer that appended it runs the tool. So the log says a tool may
have started before it changes anything, and nothing is kept in memory to say so: when
the checkpoint is the event a call is still owed from, the run was interrupted (a crash or
restart); an idempotent tool (write_file, edit_file) runs again, a non-idempotent one
(shell) is not: ToolFailed "outcome_unknown" tells the model (or a person) to check.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from loopstream.core import cancel
from loopstream.core import events as ev
from loopstream.core.memory import MemoryStore
from loopstream.core.processor import Emit
from loopstream.core.secrets import mentions_placeholder, placeholders_from_outside, reveal
from loopstream.core.state import PendingCall, SessionState
from loopstream.processors import hooks
from loopstream.processors.guardrails import check_tool_call, no_reviewer, review, reviewer_blocked
from loopstream.processors.retry import retry_delay_ms
from loopstream.providers.base import Provider, ToolCall
from loopstream.tools.checkpoint import CheckpointError, Workspace
from loopstream.tools.permissions import decide
from loopstream.tools.registry import Tool, ToolContext, ToolError, ToolOutcome, ToolRegistry
from loopstream.tools.scope import check as scope_check

MAX_RESULT_CHARS = 16_000
TRANSIENT_KINDS = frozenset({"timeout", "transient"})  # raise ToolError(..., kind="transient") to ask for a retry


def _with_timeout(fn, timeout: float):
    """Run `fn` in a daemon thread and wait at most `timeout` seconds (TimeoutError), or until
    the driver cancels the work (Interrupted: core/cancel.py). Python cannot kill a thread: a
    tool that overruns or is interrupted keeps running in the background, but the loop goes
    on (a `shell` command is killed: it registers its process group with the token)."""
    def guarded():
        try:
            return fn()
        except (SystemExit, KeyboardInterrupt) as exc:  # the tool's own doing: it must not stop the runtime
            raise ToolError(f"the tool raised {type(exc).__name__}({exc})", "tool_exit") from None

    return cancel.run_in_thread(guarded, timeout=timeout, name="loopstream-tool")


class ToolProcessor:
    name = "tools"
    acts_for = "tools"  # awaiting_tools / awaiting_approval: each pending call not waiting for a person
    triggers = frozenset({"ToolRequested", "ToolCallReviewed", "WorkspaceCheckpointed", "ApprovalDecided",
                          "RetryScheduled", "HookDecided"})

    def __init__(self, registry: ToolRegistry, *, checkpoints: bool = True, reviewer: Provider | None = None,
                 memory: MemoryStore | None = None) -> None:
        self.registry = registry
        self.memory = memory  # the log's memory store, for the memory tools (tools/memory.py)
        self.checkpoints = checkpoints  # snapshot the workspace before each side-effect tool
        self.reviewer = reviewer  # the model that reviews tool calls when a guardrail asks for it

    def handle(self, event: ev.Event, state: SessionState, now_ms: int) -> list[Emit]:
        """The next step of the pending call that `event` carries on (the driver calls it
        only for the event the call's work is owed from, `PendingCall.owed_seq`)."""
        p = event.payload
        rec = state.pending_calls[p.ref_id if isinstance(p, ev.RetryScheduled) else p.call_id]
        call, started = rec.call, time.monotonic()
        if isinstance(p, ev.WorkspaceCheckpointed):  # owed again after its checkpoint: it may have run
            return self._redo_started(rec, p.commit, state, now_ms)
        if isinstance(p, ev.ApprovalDecided) and not p.approved:
            return [self._failed(call.call_id, call.name, "denied_by_user",
                                 f"{p.by} denied this call" + (f": {p.reason}" if p.reason else ""), started)]
        if isinstance(p, ev.ApprovalDecided | ev.RetryScheduled):  # a person approved it / its next attempt
            return self._proceed(call, state, now_ms)
        if isinstance(p, ev.HookDecided) and p.point == "PermissionRequest":  # a hook approved it for a person
            return self._proceed(call, state, now_ms)
        if isinstance(p, ev.ToolRequested) and (bad := _bad_arguments(p.arguments_json)) is not None:
            return [self._failed(call.call_id, call.name, "invalid_arguments", bad, started)]
        if not rec.hooked and (pre := hooks.matching(state.policy.hooks, "PreToolUse", call.name)):
            return self._pre_hooks(pre, call, state, started)
        # ToolRequested, or ToolCallReviewed (allowed): through the gate, then on
        if (gated := self._gate(rec, state, started)) is not None:
            return gated
        return self._proceed(call, state, now_ms)

    def _pre_hooks(self, pre: list, call: ToolCall, state: SessionState, started: float) -> list[Emit]:
        """Run the PreToolUse hooks in order (each sees the arguments the one before left) and
        record each decision; the call goes on from the last HookDecided, unless one denied
        (ToolFailed hook_denied), asked a person (ApprovalRequested) or stopped the session."""
        emits: list[Emit] = []
        arguments = dict(call.arguments)
        for i, hook in enumerate(pre):
            decision, ms = hooks.run_hook(hook, self._hook_input("PreToolUse", call.name, arguments, state),
                                          state.workdir or ".")
            if decision.arguments is not None:
                arguments = decision.arguments
            emits.append(Emit(decision.event(hook, call.call_id, ms), key=f"{call.call_id}.pre.{i}"))
            why = decision.reason or f"hook {hook.label}"
            if decision.decision == "deny":
                return [*emits, self._failed(call.call_id, call.name, "hook_denied",
                                             f"denied by a PreToolUse hook: {why}", started)]
            if decision.decision == "stop":
                return [*emits, Emit(ev.SessionFailed(reason=f"tool call {call.name} stopped by {why}",
                                                      error_kind="hook_failed"))]
            if decision.decision == "ask":
                return [*emits, *self._ask(call, arguments, f"a hook asks: {why}", state, started)]
        return emits

    def _ask(self, call: ToolCall, arguments: dict, reason: str, state: SessionState, started: float) -> list[Emit]:
        """A person is to approve or deny the call: first the PermissionRequest hooks, in order,
        may approve it (the call runs on from their HookDecided) or deny it (ToolFailed
        hook_denied); else ApprovalRequested. Each decision is recorded with what follows it."""
        emits: list[Emit] = []
        for i, hook in enumerate(hooks.matching(state.policy.hooks, "PermissionRequest", call.name)):
            decision, ms = hooks.run_hook(hook, self._hook_input("PermissionRequest", call.name, arguments, state,
                                                                 reason=reason), state.workdir or ".")
            decision.arguments = None
            emits.append(Emit(decision.event(hook, call.call_id, ms), key=f"{call.call_id}.perm.{i}"))
            why = decision.reason or f"hook {hook.label}"
            if decision.decision == "allow" and decision.said:
                return emits  # approved: the tool processor runs it from this decision
            if decision.decision in ("deny", "stop"):
                return [*emits, self._failed(call.call_id, call.name, "hook_denied",
                                             f"denied by a PermissionRequest hook: {why}", started)]
        return [*emits, Emit(ev.ApprovalRequested(call_id=call.call_id, name=call.name,
                                                  arguments_json=json.dumps(arguments, sort_keys=True),
                                                  reason=reason), key=call.call_id)]

    @staticmethod
    def _hook_input(point: str, name: str, arguments: dict, state: SessionState, **extra: object) -> dict:
        return {"hook_event_name": point, "session_id": state.session_id, "cwd": state.workdir or ".",
                "tool_name": name, "tool_input": arguments, **extra}

    def _post_hooks(self, done: Emit, call: ToolCall, state: SessionState) -> list[Emit]:
        """Run the PostToolUse hooks on a finished call: each decision is recorded with the result
        (one batch), and what a hook says (a denial's reason, its note) is added to the result."""
        p = done.payload
        ok = isinstance(p, ev.ToolCompleted)
        post = hooks.matching(state.policy.hooks, "PostToolUse", call.name)
        if not ok:  # a failed call: its Failure hooks too
            post += hooks.matching(state.policy.hooks, "Failure", call.name)
        if not post:
            return [done]
        emits: list[Emit] = []
        notes: list[str] = []
        for i, hook in enumerate(post):
            extra = {"tool_response": p.result} if ok else {"tool_error": p.message}
            decision, ms = hooks.run_hook(hook, self._hook_input(hook.event, call.name, call.arguments, state,
                                                                 **extra), state.workdir or ".")
            decision.arguments = None  # the call has run: nothing to rewrite
            emits.append(Emit(decision.event(hook, call.call_id, ms), key=f"{call.call_id}.post.{i}"))
            if decision.decision == "stop":
                return [*emits, done, Emit(ev.SessionFailed(reason=f"after {call.name}: {decision.reason}",
                                                            error_kind="hook_failed"))]
            note = " ".join(x for x in (decision.reason if decision.decision != "allow" else "", decision.context) if x)
            if note:
                notes.append(f"[{hook.event} hook {hook.label}: {note}]")
        if notes and ok:
            done = Emit(p.model_copy(update={"result": p.result + "\n" + "\n".join(notes)}), key=done.key)
        elif notes:
            done = Emit(p.model_copy(update={"message": p.message + "\n" + "\n".join(notes)}), key=done.key)
        return [*emits, done]

    def _redo_started(self, rec: PendingCall, commit: str, state: SessionState, now_ms: int) -> list[Emit]:
        """The call's checkpoint is in the log (written right before the tool runs) and it has
        no result: the run was interrupted, partly or fully done. An idempotent tool runs
        again; running a non-idempotent one again could do it twice, so say so instead."""
        call = rec.call
        tool = self._allowed(state).tools.get(call.name)
        if tool is not None and not tool.idempotent:
            return [self._failed(call.call_id, call.name, "outcome_unknown",
                                 f"{call.name} was started before a crash or restart and its result was not "
                                 f"recorded; it is not idempotent, so it was not run again. Check its effects "
                                 f"(workspace checkpoint {commit[:12]} holds the files from before it) and "
                                 f"call it again only if needed.", time.monotonic())]
        return self._run(call, state, now_ms, time.monotonic())

    def _gate(self, rec: PendingCall, state: SessionState, started: float) -> list[Emit] | None:
        """Guardrails (patterns, then the reviewer model), then permission rules: block,
        deny, ask a person — or None to go on. A review not yet in the log is asked for and
        recorded (ToolCallReviewed); the call goes on from that event."""
        call = rec.call
        guard = state.policy.guardrails
        if guard:
            if (trip := check_tool_call(guard, call)) is not None:
                return self._blocked(trip, call.name)
            if guard.review_tool_calls:
                if self.reviewer is None:
                    return self._blocked(no_reviewer(call), call.name)
                if rec.review is None:
                    verdict = review(self.reviewer, call, state.goal)
                    blocked = [] if verdict.allowed else self._blocked(reviewer_blocked(guard, verdict), call.name)
                    return [Emit(verdict, key=call.call_id), *blocked]
        why = scope_check(state.policy.scope, call.name, call.arguments, Path(state.workdir or "."))
        if why is not None:
            return [self._failed(call.call_id, call.name, "scope_denied", why, started)]
        permissions = state.policy.permissions
        if permissions:
            decision = decide(permissions, call.name, call.arguments)
            if decision.action == "deny":
                return [self._failed(call.call_id, call.name, "permission_denied",
                                     f"not allowed by policy: {decision.reason}", started)]
            if decision.action == "ask":
                return self._ask(call, call.arguments, decision.reason, state, started)
        return None

    @staticmethod
    def _blocked(trip: ev.GuardrailTripped, name: str) -> list[Emit]:
        stop = [Emit(ev.SessionFailed(reason=f"tool call {name} blocked by guardrail {trip.rule}: {trip.message}",
                                      error_kind="guardrail"))] if trip.action == "stop" else []
        return [Emit(trip, key=trip.call_id), *stop]

    def _proceed(self, call: ToolCall, state: SessionState, now_ms: int) -> list[Emit]:
        """Run a read-only tool now. A side-effect tool: snapshot the workspace and emit
        WorkspaceCheckpointed, and run the tool only once that event is in the log
        (`Emit.then`), so the log says it may have started before it does."""
        started = time.monotonic()
        tool = self._allowed(state).tools.get(call.name)
        if self.checkpoints and tool is not None and not tool.read_only:
            try:
                tool.validate(call.arguments)  # bad arguments fail now: no checkpoint for a call that cannot run
            except ToolError as exc:
                return [self._failed(call.call_id, call.name, exc.kind, str(exc), started)]
            return [self._checkpoint(call, state, started)]
        return self._run(call, state, now_ms, started)

    def _allowed(self, state: SessionState) -> ToolRegistry:
        # Only the tools this session was started with are callable.
        return self.registry.select([n for n in state.tools if n in self.registry.tools])

    def _checkpoint(self, call: ToolCall, state: SessionState, started: float) -> Emit:
        workspace = Workspace(state.workdir or ".", exclude=state.policy.checkpoint_exclude)
        try:
            snap = workspace.snapshot(f"before {call.name} (session {state.session_id}, call {call.call_id})")
        except CheckpointError as exc:
            return self._failed(call.call_id, call.name, "checkpoint_failed",
                                f"{call.name} did not run: the workspace could not be checkpointed first: {exc}",
                                started)
        return Emit(ev.WorkspaceCheckpointed(
            call_id=call.call_id, commit=snap.commit, workdir=str(workspace.workdir),
            files_changed=snap.files_changed,
        ), key=call.call_id, then=lambda now_ms: self._run(call, state, now_ms, time.monotonic()))

    def _run(self, call: ToolCall, state: SessionState, now_ms: int, started: float) -> list[Emit]:
        """The call run, and its PostToolUse hooks on the outcome (a retry runs none yet)."""
        *before, done = self._run_once(call, state, now_ms, started)
        if isinstance(done.payload, ev.ToolCompleted | ev.ToolFailed):
            return [*before, *self._post_hooks(done, call, state)]
        return [*before, done]

    def _run_once(self, call: ToolCall, state: SessionState, now_ms: int, started: float) -> list[Emit]:
        """The call's outcome, last; before it the events its result carries (ToolOutcome)."""
        name, call_id = call.name, call.call_id
        allowed = self._allowed(state)
        tool = allowed.tools.get(name)
        timeout = (tool.timeout_s if tool and tool.timeout_s else None) or float(
            state.policy.timeouts.tool_timeout_s)
        try:
            ctx = ToolContext(workdir=Path(state.workdir or "."), session_id=state.session_id, policy=state.policy,
                              memory=self.memory)
            args = reveal(call.arguments, placeholders_from_outside(state.messages)) \
                if state.policy.secrets.reveal_to_tools and mentions_placeholder(call.arguments) \
                else call.arguments  # the log keeps [REDACTED:NAME]; the conversation is scanned only if needed
            result = _with_timeout(lambda: allowed.call(name, args, ctx), timeout)
        except TimeoutError:
            return [self._retry_or_fail(call, "timeout", f"{name} did not finish within {timeout:g}s "
                                        "(it may still be running)", state, tool, now_ms, started)]
        except ToolError as exc:
            return [self._retry_or_fail(call, exc.kind, str(exc), state, tool, now_ms, started)]
        except ConnectionError as exc:  # a service the tool uses is unreachable: worth another try
            return [self._retry_or_fail(call, "transient", f"{type(exc).__name__}: {exc}", state, tool, now_ms,
                                        started)]
        except Exception as exc:  # a bug in a user's tool must reach the model, not kill the loop
            return [self._failed(call_id, name, "tool_exception", f"{type(exc).__name__}: {exc}", started)]
        before = []
        if isinstance(result, ToolOutcome):
            before = [Emit(p, key=f"{call_id}.{i}") for i, p in enumerate(result.events)]
            result = result.text
        if len(result) > MAX_RESULT_CHARS:
            result = result[:MAX_RESULT_CHARS] + f"\n…(truncated {len(result) - MAX_RESULT_CHARS} chars)"
        return [*before, Emit(ev.ToolCompleted(call_id=call_id, name=name, result=result, latency_ms=_ms(started)))]

    def _retry_or_fail(self, call: ToolCall, kind: str, message: str, state: SessionState, tool: Tool | None,
                       now_ms: int, started: float) -> Emit:
        """A transient failure of an idempotent tool is retried with backoff (RetryScheduled,
        counted from `now_ms`, when the attempt was handed out); anything else, or the last
        attempt, is a ToolFailed the model reads."""
        attempt = state.pending_calls[call.call_id].attempt + 1
        limit = state.policy.retries.max_tool_attempts
        if tool is None or not tool.idempotent or kind not in TRANSIENT_KINDS or attempt > limit:
            return self._failed(call.call_id, call.name, kind, message, started)
        delay = retry_delay_ms(attempt, call.call_id, None, state.policy.retries) or 0
        return Emit(ev.RetryScheduled(target="tool", ref_id=call.call_id, attempt=attempt, delay_ms=delay,
                                      not_before_ms=now_ms + delay, reason=f"{kind}: {message}"[:500]),
                    key=call.call_id)

    @staticmethod
    def _failed(call_id: str, name: str, kind: str, message: str, started: float) -> Emit:
        return Emit(ev.ToolFailed(
            call_id=call_id, name=name, error_kind=kind, message=message, latency_ms=_ms(started)
        ))


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _bad_arguments(arguments_json: str) -> str | None:
    """Why a call's arguments are unusable (not a JSON object), or None."""
    try:
        arguments = json.loads(arguments_json)
    except ValueError as exc:
        return f"arguments are not JSON: {exc}"
    return None if isinstance(arguments, dict) else "tool arguments must be a JSON object"
