"""`loopstream approve`, `deny` and `cancel`: a person's decisions, recorded from any terminal."""
from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from loopstream.cli import output
from loopstream.cli.common import BusOpt, DbOpt, SessionArg, UserError, resolve, writer
from loopstream.runtime.decisions import WaitingCall, decide, load, waiting_call
from loopstream.runtime.decisions import cancel as cancel_session

CallArg = Annotated[Optional[str], typer.Argument(
    help="The tool call (default: the only one waiting, after you confirm it at a terminal).", show_default=False)]


def approve(
    session: SessionArg,
    call_id: CallArg = None,
    note: Annotated[str, typer.Option(help="Why, for the record.")] = "",
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Approve a tool call that a permission rule sent to a person (works from any process).
    Without CALL_ID it shows the one waiting call and asks; where nobody can answer (no
    terminal), name the call."""
    _decide(session, call_id, True, note, db, bus)


def deny(
    session: SessionArg,
    call_id: CallArg = None,
    reason: Annotated[str, typer.Option(help="Told to the model.")] = "",
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Deny a tool call waiting for approval; the model is told and continues without it."""
    _decide(session, call_id, False, reason, db, bus)


def _decide(session: str, call_id: str | None, approved: bool, reason: str, db, bus) -> None:
    log = writer(bus, db)
    sid = resolve(log, session)
    call = waiting_call(load(log, sid), call_id)
    if call_id is None and approved:
        confirm_unnamed(sid, call)
    decision = decide(log, sid, call.call_id, approved, reason=reason)
    verb = "approved" if decision.approved else "denied"
    output.answer(f"{verb} {call.describe()} (call {call.call_id}) of session {sid}; a waiting `loopstream run` "
                  f"continues by itself, otherwise: loopstream resume {sid}")


def confirm_unnamed(sid: str, call: WaitingCall) -> None:
    """Approving a call the person did not name: show it and ask; with nobody to ask, refuse."""
    what = f"{call.describe()} (call {call.call_id}, {call.reason})"
    if not sys.stdin.isatty():
        raise UserError(f"session {sid} waits for approval of {what}; approve it by name: "
                        f"loopstream approve {sid} {call.call_id}")
    output.note(f"session {sid} waits for approval of {what}")
    if not typer.confirm("approve it?", default=False, err=True):
        raise typer.Exit(1)


def cancel(
    session: SessionArg,
    reason: Annotated[str, typer.Option(help="Recorded in the SessionCancelled event.")] = "cancelled by a person",
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Cancel a session that has not ended."""
    log = writer(bus, db)
    sid = resolve(log, session)
    cancel_session(log, sid, reason=reason)
    output.answer(f"cancelled session {sid}")
