"""Running hooks (core/policy.py `Hook`): a command or a Python callable at one point of the
loop, whose decision the processor owed that point's work records as a HookDecided event
before it acts on it, so a replay, a resume or a redelivery reads the decision and never runs
the hook again. The tool processor runs PreToolUse, PostToolUse, PermissionRequest and a tool's
Failure hooks; the model processor PreModelCall, PostModelCall and a model call's Failure; the
compaction processor PreCompact; `EndHooks` (here) SessionEnd, owed once a session ended.

The protocol follows Claude Code's hooks. Input (JSON on stdin, or the callable's argument):
`{"hook_event_name", "session_id", "cwd", "tool_name", "tool_input", "tool_response"?}`.
Output (JSON on stdout, or the callable's return; empty or None: allow):
`{"decision": "allow" | "deny" | "ask", "reason": "...", "tool_input": {...},
"additional_context": "..."}` — Claude Code's `permissionDecision`, `permissionDecisionReason`,
`updatedInput`, `block`/`approve`, also inside `hookSpecificOutput`, are read too. A command
that exits 2 denies, its stderr the reason. Another non-zero exit, a timeout, or output that is
not a JSON object is a failure, handled as the hook's `on_error` says (deny, allow, stop).
"""
from __future__ import annotations

import fnmatch
import importlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from loopstream.core import cancel
from loopstream.core import events as ev
from loopstream.core.policy import Hook
from loopstream.core.processor import Emit
from loopstream.core.state import SessionState

MAX_OUTPUT = 64_000


class HookFailed(Exception):
    """The hook did not give a usable decision (exit status, timeout, bad output)."""


@dataclass
class Decision:
    decision: str  # allow | deny | ask | error
    reason: str = ""
    arguments: dict[str, Any] | None = None  # rewritten tool arguments
    context: str = ""  # a note for the model
    said: bool = False  # the hook gave a decision (not silence, which allows where allowing is the default)

    def event(self, hook: Hook, call_id: str | None, latency_ms: int) -> ev.HookDecided:
        return ev.HookDecided(point=hook.event, hook=hook.label, call_id=call_id, decision=self.decision,
                              reason=self.reason[:2000], context=self.context[:8000], latency_ms=latency_ms,
                              arguments_json=None if self.arguments is None else json.dumps(self.arguments,
                                                                                            sort_keys=True))


def matching(hooks: list[Hook], point: str, tool: str | None = None) -> list[Hook]:
    return [h for h in hooks if h.event == point and (tool is None or fnmatch.fnmatchcase(tool, h.matcher))]


def run_hook(hook: Hook, payload: dict[str, Any], cwd: str) -> tuple[Decision, int]:
    """The hook's decision (a failure: per its `on_error`) and how long it took (ms)."""
    started = time.monotonic()
    try:
        raw = _call(hook, payload, cwd)
        decision = parse(raw)
    except HookFailed as exc:
        reason = f"hook {hook.label} failed: {exc}"
        decision = Decision("deny" if hook.on_error == "deny" else "error", reason)
        if hook.on_error == "stop":
            decision = Decision("stop", reason)
    return decision, int((time.monotonic() - started) * 1000)


def _call(hook: Hook, payload: dict[str, Any], cwd: str) -> Any:
    if hook.python:
        module, _, name = hook.python.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise HookFailed(f"cannot import {hook.python}: {exc}") from None
        try:
            return cancel.run_in_thread(lambda: fn(dict(payload)), timeout=hook.timeout_s, name="loopstream-hook")
        except TimeoutError:
            raise HookFailed(f"did not answer within {hook.timeout_s:g}s") from None
        except Exception as exc:
            raise HookFailed(f"raised {type(exc).__name__}: {exc}") from None
    try:
        done = subprocess.run(hook.command, input=json.dumps(payload), capture_output=True, text=True,
                              timeout=hook.timeout_s, cwd=cwd if os.path.isdir(cwd) else None,
                              errors="replace")
    except subprocess.TimeoutExpired:
        raise HookFailed(f"did not answer within {hook.timeout_s:g}s") from None
    except OSError as exc:
        raise HookFailed(f"cannot run {hook.command[0]!r}: {exc.strerror or exc}") from None
    if done.returncode == 2:
        return {"decision": "deny", "reason": done.stderr.strip()[:2000] or "denied by hook (exit 2)"}
    if done.returncode != 0:
        raise HookFailed(f"exit status {done.returncode}: {' '.join(done.stderr.split())[:300]}")
    out = done.stdout.strip()[:MAX_OUTPUT]
    if not out:
        return None
    try:
        return json.loads(out)
    except ValueError:
        raise HookFailed(f"output is not JSON: {out[:100]!r}") from None


_DECISIONS = {"allow": "allow", "approve": "allow", "deny": "deny", "block": "deny", "ask": "ask"}


def parse(raw: Any) -> Decision:
    """A hook's output as a Decision; HookFailed when it is not one."""
    if raw is None:
        return Decision("allow")
    if not isinstance(raw, dict):
        raise HookFailed(f"output must be a JSON object, got {type(raw).__name__}")
    data = {**raw, **(raw.get("hookSpecificOutput") or {})} if isinstance(raw.get("hookSpecificOutput"), dict) else raw
    said = data.get("decision", data.get("permissionDecision", "allow"))
    explicit = "decision" in data or "permissionDecision" in data
    if isinstance(said, dict):  # Claude Code's PermissionRequest: {"decision": {"behavior": "allow", "message"}}
        data = {**data, "reason": said.get("message", data.get("reason", ""))}
        said = said.get("behavior")
    if not isinstance(said, str) or said not in _DECISIONS:
        raise HookFailed(f"unknown decision {str(said)[:40]!r} (allow, deny or ask)")
    arguments = data.get("tool_input", data.get("updatedInput"))
    if arguments is not None and not isinstance(arguments, dict):
        raise HookFailed("tool_input must be a JSON object")
    reason = data.get("reason", data.get("permissionDecisionReason", ""))
    context = data.get("additional_context", data.get("additionalContext", ""))
    return Decision(_DECISIONS[said], str(reason), arguments, str(context), explicit)


@dataclass
class Verdict:
    """What the hooks of one point decided, together: their events (in order) and the outcome."""

    emits: list[Emit]
    stopped: str = ""  # why the session must end (a hook denied or stopped it), else ""
    notes: list[str] | None = None  # the notes the hooks gave (additional_context)


def run_point(point: str, state: SessionState, payload: dict[str, Any], key: str,
              target: str | None = None) -> Verdict:
    """Run the hooks of `point` (matching `target` when given) in order, each decision an Emit
    keyed `key.i`. At a point that is not about a tool call, deny and stop both end the
    session (`stopped`); a note (additional_context) is collected."""
    emits: list[Emit] = []
    notes: list[str] = []
    for i, hook in enumerate(matching(state.policy.hooks, point, target)):
        data = {"hook_event_name": point, "session_id": state.session_id, "cwd": state.workdir or ".", **payload}
        decision, ms = run_hook(hook, data, state.workdir or ".")
        decision.arguments = None  # nothing to rewrite at these points
        emits.append(Emit(decision.event(hook, None, ms), key=f"{key}.{i}"))
        if decision.context:
            notes.append(decision.context)
        if decision.decision in ("deny", "stop"):
            return Verdict(emits, f"{point} hook {hook.label}: {decision.reason or decision.decision}", notes)
    return Verdict(emits, "", notes)


def stop_session(verdict: Verdict) -> Emit:
    """The SessionFailed a denying or stopping hook ends the session with."""
    return Emit(ev.SessionFailed(reason=f"stopped by {verdict.stopped}"[:2000], error_kind="hook_stopped"))


class EndHooks:
    """SessionEnd hooks: owed once a session ended (core/state.py open_work, actor "hooks");
    their decisions are recorded after the end (they cannot change it)."""

    name = "hooks"
    acts_for = "hooks"
    triggers = frozenset({"SessionFinished", "SessionFailed", "SessionCancelled"})

    def handle(self, event: ev.Event, state: SessionState, now_ms: int) -> list[Emit]:
        p = event.payload
        payload = {"status": str(state.status), "reason": getattr(p, "reason", ""),
                   "answer": getattr(p, "answer", None), "agent": state.agent}
        return run_point("SessionEnd", state, payload, "end").emits
