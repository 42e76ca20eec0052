"""Running hooks (core/policy.py `Hook`): a command or a Python callable at one point of the
loop, whose decision the tool processor records as a HookDecided event before it acts on it,
so a replay, a resume or a redelivery reads the decision and never runs the hook again.

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

MAX_OUTPUT = 64_000


class HookFailed(Exception):
    """The hook did not give a usable decision (exit status, timeout, bad output)."""


@dataclass
class Decision:
    decision: str  # allow | deny | ask | error
    reason: str = ""
    arguments: dict[str, Any] | None = None  # rewritten tool arguments
    context: str = ""  # a note for the model

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
    if said not in _DECISIONS:
        raise HookFailed(f"unknown decision {str(said)[:40]!r} (allow, deny or ask)")
    arguments = data.get("tool_input", data.get("updatedInput"))
    if arguments is not None and not isinstance(arguments, dict):
        raise HookFailed("tool_input must be a JSON object")
    reason = data.get("reason", data.get("permissionDecisionReason", ""))
    context = data.get("additional_context", data.get("additionalContext", ""))
    return Decision(_DECISIONS[said], str(reason), arguments, str(context))
