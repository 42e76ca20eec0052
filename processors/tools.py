"""The tool processor: ToolRequested → run the tool → ToolCompleted | ToolFailed.

Unknown tools, invalid arguments and exceptions inside a tool all become ToolFailed
events the model reads on its next step; none of them stops the loop.

Before a call runs it passes a gate: guardrails (deny patterns, an optional reviewer
model whose verdict is recorded as ToolCallReviewed before the call goes on) may block
it (GuardrailTripped), and permission rules may deny it (ToolFailed permission_denied)
or ask a person (ApprovalRequested; the session waits in awaiting_approval until an
ApprovalDecided, written by `loopstream approve` / `deny`).

In-flight calls after a crash: a side-effect tool's WorkspaceCheckpointed marks it as
started. If the process that took the checkpoint is gone before the result was
recorded, an idempotent tool (write_file, edit_file) runs again; a non-idempotent one
(shell) is not re-run: ToolFailed "outcome_unknown" tells the model (or a person) to
check and decide.

A side-effect tool (`read_only=False`) takes two steps: on its ToolRequested the
processor snapshots the workspace and emits WorkspaceCheckpointed (nothing else), and
on that event it runs the tool. So the checkpoint is in the log before the tool
changes anything, and each step stays a plain handler (event in, events out).
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from loopstream.core import events as ev
from loopstream.core.processor import Emit
from loopstream.core.state import SessionState
from loopstream.processors.guardrails import check_tool_call, no_reviewer, review, reviewer_blocked
from loopstream.processors.retry import retry_delay_ms
from loopstream.providers.base import Provider, ToolCall
from loopstream.tools.checkpoint import CheckpointError, Workspace
from loopstream.tools.permissions import decide
from loopstream.tools.registry import Tool, ToolContext, ToolError, ToolRegistry

MAX_RESULT_CHARS = 16_000
DEFAULT_TOOL_TIMEOUT_S = 300.0
DEFAULT_MAX_TOOL_ATTEMPTS = 3
TRANSIENT_KINDS = frozenset({"timeout", "transient"})  # raise ToolError(..., kind="transient") to ask for a retry


def _with_timeout(fn, timeout: float):
    """Run `fn` in a daemon thread and wait at most `timeout` seconds. Python cannot kill a
    thread: a tool that overruns keeps running in the background, but the loop goes on."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except (SystemExit, KeyboardInterrupt) as exc:  # the tool's own doing: it must not stop the runtime
            box["error"] = ToolError(f"the tool raised {type(exc).__name__}({exc})", "tool_exit")
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=target, daemon=True, name="loopstream-tool")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box["result"]


class ToolProcessor:
    name = "tools"
    triggers = frozenset({"ToolRequested", "ToolCallReviewed", "WorkspaceCheckpointed", "ApprovalDecided",
                          "RetryScheduled"})

    def __init__(self, registry: ToolRegistry, *, checkpoints: bool = True, reviewer: Provider | None = None) -> None:
        self.registry = registry
        self.checkpoints = checkpoints  # snapshot the workspace before each side-effect tool
        self.reviewer = reviewer  # the model that reviews tool calls when a guardrail asks for it
        # Calls this process checkpointed and is about to run. A checkpoint not in here was
        # taken by a process that died: the in-flight policy decides (retry if idempotent).
        self._started: set[str] = set()

    def handle(self, event: ev.Event, state: SessionState) -> list[Emit]:
        p = event.payload
        if isinstance(p, ev.WorkspaceCheckpointed):  # step 2 of a side-effect tool
            call = state.pending_calls.get(p.call_id)
            if call is None:
                return []  # already settled (a redelivery)
            tool = self._allowed(state).tools.get(call.name)
            if p.call_id not in self._started and tool is not None and not tool.idempotent:
                # Checkpointed by a process that is gone: the tool may have run, partly or
                # fully. Running a non-idempotent tool again could do it twice, so say so.
                return [self._failed(call.call_id, call.name, "outcome_unknown",
                                     f"{call.name} was started before a crash or restart and its result was not "
                                     f"recorded; it is not idempotent, so it was not run again. Check its effects "
                                     f"(workspace checkpoint {p.commit[:12]} holds the files from before it) and "
                                     f"call it again only if needed.", time.monotonic())]
            self._started.discard(p.call_id)
            return [self._run(call.call_id, call.name, call.arguments, state, time.monotonic())]
        if isinstance(p, ev.RetryScheduled):  # a transient failure's next attempt
            call = state.pending_calls.get(p.ref_id)
            if p.target != "tool" or call is None or state.tool_retry_at.get(p.ref_id) != p.not_before_ms:
                return []  # a model retry, a settled call, or a superseded schedule
            if ev.now_ms() < p.not_before_ms:
                return []  # not due: the runtime waits until state.wake_at_ms
            return self._proceed(call.call_id, call.name, call.arguments, state, time.monotonic())
        if isinstance(p, ev.ToolCallReviewed):  # the reviewer allowed it: on through the rest of the gate
            call = state.pending_calls.get(p.call_id)
            if not p.allowed or call is None or self._carried_on(p.call_id, state):
                return []  # blocked (its GuardrailTripped settled it), or already carried on
            started = time.monotonic()
            if (gated := self._gate(call, json.dumps(call.arguments, sort_keys=True), state, started)) is not None:
                return gated
            return self._proceed(call.call_id, call.name, call.arguments, state, started)
        if isinstance(p, ev.ApprovalDecided):  # a person answered: run it, or tell the model
            call = state.pending_calls.get(p.call_id)
            if call is None or p.call_id in state.checkpointed_calls or p.call_id in state.open_approvals:
                return []
            if not p.approved:
                return [self._failed(call.call_id, call.name, "denied_by_user",
                                     f"{p.by} denied this call" + (f": {p.reason}" if p.reason else ""),
                                     time.monotonic())]
            return self._proceed(call.call_id, call.name, call.arguments, state, time.monotonic())
        req = p
        assert isinstance(req, ev.ToolRequested)
        if req.call_id not in state.pending_calls or self._carried_on(req.call_id, state) \
                or req.call_id in state.tool_reviews:
            return []  # already settled (a redelivery), or a later event of this call carries it on
        started = time.monotonic()
        try:
            arguments = json.loads(req.arguments_json)
        except ValueError as exc:
            return [self._failed(req.call_id, req.name, "invalid_arguments", f"arguments are not JSON: {exc}", started)]
        if not isinstance(arguments, dict):
            return [self._failed(req.call_id, req.name, "invalid_arguments",
                                 "tool arguments must be a JSON object", started)]
        call = ToolCall(call_id=req.call_id, name=req.name, arguments=arguments)
        if (gated := self._gate(call, req.arguments_json, state, started)) is not None:
            return gated
        return self._proceed(req.call_id, req.name, arguments, state, started)

    @staticmethod
    def _carried_on(call_id: str, state: SessionState) -> bool:
        """A later event of this call (checkpoint, approval, retry) carries it on."""
        return (call_id in state.checkpointed_calls or call_id in state.approvals
                or call_id in state.open_approvals or call_id in state.tool_retry_at)

    def _gate(self, call: ToolCall, arguments_json: str, state: SessionState, started: float) -> list[Emit] | None:
        """Guardrails (patterns, then the reviewer model), then permission rules: block,
        deny, ask a person — or None to go on. A review not yet in the log is asked for and
        recorded (ToolCallReviewed); the call goes on from that event."""
        guard = state.config.get("guardrails")
        if guard:
            if (trip := check_tool_call(guard, call)) is not None:
                return self._blocked(trip, call.name)
            if guard.get("review_tool_calls"):
                if self.reviewer is None:
                    return self._blocked(no_reviewer(call), call.name)
                if call.call_id not in state.tool_reviews:
                    verdict = review(self.reviewer, call, state.goal)
                    blocked = [] if verdict.allowed else self._blocked(reviewer_blocked(guard, verdict), call.name)
                    return [Emit(verdict, key=call.call_id), *blocked]
        permissions = state.config.get("permissions")
        if permissions:
            decision = decide(permissions, call.name, call.arguments)
            if decision.action == "deny":
                return [self._failed(call.call_id, call.name, "permission_denied",
                                     f"not allowed by policy: {decision.reason}", started)]
            if decision.action == "ask":
                return [Emit(ev.ApprovalRequested(call_id=call.call_id, name=call.name,
                                                  arguments_json=arguments_json, reason=decision.reason),
                             key=call.call_id)]
        return None

    @staticmethod
    def _blocked(trip: ev.GuardrailTripped, name: str) -> list[Emit]:
        stop = [Emit(ev.SessionFailed(reason=f"tool call {name} blocked by guardrail {trip.rule}: {trip.message}",
                                      error_kind="guardrail"))] if trip.action == "stop" else []
        return [Emit(trip, key=trip.call_id), *stop]

    def _proceed(self, call_id: str, name: str, arguments: dict, state: SessionState, started: float) -> list[Emit]:
        """Run a read-only tool now; checkpoint the workspace first for a side-effect tool."""
        tool = self._allowed(state).tools.get(name)
        if self.checkpoints and tool is not None and not tool.read_only:
            try:
                tool.validate(arguments)  # bad arguments fail now: no checkpoint for a call that cannot run
            except ToolError as exc:
                return [self._failed(call_id, name, exc.kind, str(exc), started)]
            return [self._checkpoint(call_id, name, state, started)]
        return [self._run(call_id, name, arguments, state, started)]

    def _allowed(self, state: SessionState) -> ToolRegistry:
        # Only the tools this session was started with are callable.
        return self.registry.select([n for n in state.tools if n in self.registry.tools])

    def _checkpoint(self, call_id: str, name: str, state: SessionState, started: float) -> Emit:
        workspace = Workspace(state.workdir or ".", exclude=state.config.get("checkpoint_exclude", ()))
        try:
            snap = workspace.snapshot(f"before {name} (session {state.session_id}, call {call_id})")
        except CheckpointError as exc:
            return self._failed(call_id, name, "checkpoint_failed",
                                f"{name} did not run: the workspace could not be checkpointed first: {exc}",
                                started)
        self._started.add(call_id)
        return Emit(ev.WorkspaceCheckpointed(
            call_id=call_id, commit=snap.commit, workdir=str(workspace.workdir),
            files_changed=snap.files_changed,
        ), key=call_id)

    def _run(self, call_id: str, name: str, arguments: dict, state: SessionState, started: float) -> Emit:
        allowed = self._allowed(state)
        tool = allowed.tools.get(name)
        timeout = (tool.timeout_s if tool and tool.timeout_s else None) or float(
            state.config.get("tool_timeout_s", DEFAULT_TOOL_TIMEOUT_S))
        try:
            ctx = ToolContext(workdir=Path(state.workdir or "."), session_id=state.session_id)
            result = _with_timeout(lambda: allowed.call(name, arguments, ctx), timeout)
        except TimeoutError:
            return self._retry_or_fail(call_id, name, "timeout",
                                       f"{name} did not finish within {timeout:g}s (it may still be running)",
                                       state, tool, started)
        except ToolError as exc:
            return self._retry_or_fail(call_id, name, exc.kind, str(exc), state, tool, started)
        except ConnectionError as exc:  # a service the tool uses is unreachable: worth another try
            return self._retry_or_fail(call_id, name, "transient", f"{type(exc).__name__}: {exc}", state, tool, started)
        except Exception as exc:  # a bug in a user's tool must reach the model, not kill the loop
            return self._failed(call_id, name, "tool_exception", f"{type(exc).__name__}: {exc}", started)
        if len(result) > MAX_RESULT_CHARS:
            result = result[:MAX_RESULT_CHARS] + f"\n…(truncated {len(result) - MAX_RESULT_CHARS} chars)"
        return Emit(ev.ToolCompleted(call_id=call_id, name=name, result=result, latency_ms=_ms(started)))

    def _retry_or_fail(self, call_id: str, name: str, kind: str, message: str, state: SessionState,
                       tool: Tool | None, started: float) -> Emit:
        """A transient failure of an idempotent tool is retried with backoff (RetryScheduled);
        anything else, or the last attempt, is a ToolFailed the model reads."""
        attempt = state.tool_attempts.get(call_id, 1) + 1
        limit = int(state.config.get("max_tool_attempts", DEFAULT_MAX_TOOL_ATTEMPTS))
        if tool is None or not tool.idempotent or kind not in TRANSIENT_KINDS or attempt > limit:
            return self._failed(call_id, name, kind, message, started)
        delay = retry_delay_ms(attempt, call_id, None, state.config) or 0
        return Emit(ev.RetryScheduled(target="tool", ref_id=call_id, attempt=attempt, delay_ms=delay,
                                      not_before_ms=ev.now_ms() + delay, reason=f"{kind}: {message}"[:500]),
                    key=call_id)

    @staticmethod
    def _failed(call_id: str, name: str, kind: str, message: str, started: float) -> Emit:
        return Emit(ev.ToolFailed(
            call_id=call_id, name=name, error_kind=kind, message=message, latency_ms=_ms(started)
        ))


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
