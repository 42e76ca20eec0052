"""What people decide about a running session, from any process: approve or deny a tool
call that waits for a person, cancel a session; and a foreground driver that waits for
those decisions (`loopstream run` while a call waits for approval)."""
from __future__ import annotations

import getpass
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from loopstream.core import events as ev
from loopstream.core.log import Log
from loopstream.core.state import SessionState
from loopstream.runtime.inline import Runtime
from loopstream.runtime.writer import SessionWriter, Written


class DecisionError(ValueError):
    """The decision cannot be recorded as asked (nothing waits, unknown call, ended session)."""


@dataclass(frozen=True)
class WaitingCall:
    """A tool call that waits for a person's decision."""

    call_id: str
    name: str
    arguments: dict
    reason: str  # the permission rule that asked for a person

    def describe(self) -> str:
        """`name({"arg": …})`: what approving it runs."""
        return f"{self.name}({json.dumps(self.arguments, ensure_ascii=False, sort_keys=True)})"


@dataclass(frozen=True)
class Decision:
    call: WaitingCall
    approved: bool
    by: str
    state: SessionState  # the session right after the decision


def person() -> str:
    """The actor recorded for a decision made at this terminal."""
    try:
        return f"person:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name in the environment or the password database
        return "person:unknown"


def load(log: Log, session_id: str) -> SessionState:
    return SessionWriter(log).load(session_id)


def waiting_calls(state: SessionState) -> list[WaitingCall]:
    """The calls of `state` that wait for a person, in the order they were asked."""
    out = []
    for call_id, reason in state.open_approvals.items():
        pending = state.pending_calls.get(call_id)
        call = pending.call if pending is not None else None
        out.append(WaitingCall(call_id, call.name if call else "?", dict(call.arguments) if call else {}, reason))
    return out


def waiting_call(state: SessionState, call_id: str | None) -> WaitingCall:
    """The call to decide on: `call_id`, or (None) the only call that waits."""
    waiting = waiting_calls(state)
    sid = state.session_id
    if not waiting:
        raise DecisionError(f"session {sid} is not waiting for an approval (it is {state.status})")
    if call_id is None:
        if len(waiting) > 1:
            listed = "; ".join(f"{w.call_id}: {w.describe()}" for w in waiting)
            raise DecisionError(f"session {sid} waits on {len(waiting)} calls, name one: {listed}")
        return waiting[0]
    for w in waiting:
        if w.call_id == call_id:
            return w
    raise DecisionError(f"call {call_id!r} is not waiting for approval; waiting: "
                        + ", ".join(w.call_id for w in waiting))


def decide(log: Log, session_id: str, call_id: str, approved: bool, *, by: str | None = None,
           reason: str = "") -> Decision:
    """Record a person's decision on the waiting call `call_id` (always named: a decision
    never lands on a call its maker has not seen)."""
    call = waiting_call(load(log, session_id), call_id)
    by = by or person()
    written = _record(log, session_id, ev.ApprovalDecided(call_id=call_id, approved=approved, by=by, reason=reason),
                      by, key=call_id)
    if written.outcome == "dropped":
        raise DecisionError(f"call {call_id!r} of session {session_id} was decided by someone else meanwhile")
    return Decision(call, approved, by, written.state)


def cancel(log: Log, session_id: str, *, by: str | None = None, reason: str = "cancelled by a person") -> SessionState:
    """Cancel a session that has not ended."""
    state = load(log, session_id)
    if state.terminal:
        raise DecisionError(f"session {session_id} already ended ({state.status})")
    by = by or person()
    written = _record(log, session_id, ev.SessionCancelled(reason=reason), by)
    if written.outcome == "dropped":
        raise DecisionError(f"session {session_id} ended meanwhile")
    cancel_children(log, state, by, f"parent session {session_id} was cancelled: {reason}")
    return written.state


def cancel_children(log: Log, state: SessionState, by: str, reason: str) -> list[str]:
    """Cancel the running children of `state`'s open delegations, and theirs (docs/subagents.md);
    the ids cancelled. A child runner driving them stops them too; this also covers a parent
    no process drives."""
    done = []
    for d in state.delegations.values():
        for child in d.children:
            if not log.next_seq(child.session_id):
                continue
            sub = load(log, child.session_id)
            if sub.terminal:
                continue
            if _record(log, child.session_id, ev.SessionCancelled(reason=reason), by).outcome == "appended":
                done.append(child.session_id)
            done += cancel_children(log, sub, by, reason)
    return done


def pause(log: Log, session_id: str, *, by: str | None = None, reason: str = "") -> SessionState:
    """Pause a session: at once between steps, else at the next step (GoalPaused). A paused
    session waits, across restarts, until `resume_paused`."""
    state = load(log, session_id)
    if state.terminal:
        raise DecisionError(f"session {session_id} already ended ({state.status})")
    if state.status == "paused" or state.pause_pending:
        raise DecisionError(f"session {session_id} is already paused{' (pending)' if state.pause_pending else ''}")
    by = by or person()
    written = _record(log, session_id, ev.GoalPaused(by=by, reason=reason), by)
    if written.outcome == "dropped":
        raise DecisionError(f"session {session_id} cannot be paused in state {written.state.status}")
    return written.state


def resume_paused(log: Log, session_id: str, *, by: str | None = None, reason: str = "") -> SessionState:
    """Resume a paused session (or withdraw a pause still pending): GoalResumed."""
    state = load(log, session_id)
    if state.status != "paused" and not state.pause_pending:
        raise DecisionError(f"session {session_id} is not paused ({state.status})")
    by = by or person()
    written = _record(log, session_id, ev.GoalResumed(by=by, reason=reason), by)
    if written.outcome == "dropped":
        raise DecisionError(f"session {session_id} could not be resumed in state {written.state.status}")
    return written.state


def _record(log: Log, session_id: str, payload: ev.Payload, actor: str, key: str = "") -> Written:
    """The one place decisions reach the session writer."""
    return SessionWriter(log).record(session_id, [payload], actor=actor, key=key)


def drive(runtime: Runtime, session_id: str, on_waiting: Callable[[WaitingCall], None] | None = None,
          poll_s: float = 0.3) -> SessionState:
    """Run a session to its end in the foreground. While it waits for a person, call
    `on_waiting` once per waiting call and wait for a decision recorded by any process."""
    shown: set[str] = set()
    while True:
        state = runtime.run_session(session_id)
        if state.status != "awaiting_approval":
            return state
        for call in waiting_calls(state):
            if call.call_id not in shown:
                shown.add(call.call_id)
                if on_waiting:
                    on_waiting(call)
        while runtime.load(session_id).status == "awaiting_approval":
            time.sleep(poll_s)
