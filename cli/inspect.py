"""`loopstream sessions` and `show`: read the log (opened read-only) and print it."""
from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer

from loopstream.cli import output
from loopstream.cli.common import BusOpt, DbOpt, SessionArg, reader, resolve
from loopstream.core.describe import short, summarize
from loopstream.core.sqlite_log import LogNotFound
from loopstream.kafka.bus import default_db
from loopstream.replay.inspect import answered_by, session_rows, show_session
from loopstream.replay.tree import parent_of, tree_lines


def sessions(db: DbOpt = None, bus: BusOpt = None,
             limit: Annotated[int, typer.Option(min=1, help="Show the newest N sessions.")] = 50) -> None:
    """List the sessions in the log, newest last, with the model of each one's last reply. A
    session that has not ended and that no process drives any more shows as `interrupted`
    (continue it with `loopstream resume`)."""
    try:
        log = reader(bus, db)
    except LogNotFound:
        if db is None and bus is None and not default_db().exists():
            output.note("no sessions yet: start one with `loopstream run \"GOAL\"`")
            return
        raise
    rows = session_rows(log, limit)
    if not rows:
        output.note("no sessions yet: start one with `loopstream run \"GOAL\"`")
        return
    output.table(["session", "started", "status", "events", "model", "goal"],
                 [(r.session_id, clock(r.created_ms, date=True), r.status, r.events, short(r.model, 30) or "-",
                   short((f"[child of {r.parent}] " if r.parent else "") + r.goal, 60))
                  for r in rows])


def show(
    session: SessionArg,
    db: DbOpt = None,
    bus: BusOpt = None,
    width: Annotated[int, typer.Option(min=10, help="Width of the payload column.")] = 90,
) -> None:
    """Print a session's event timeline: seq, time, type, actor, payload (first, the models
    that answered, as ModelResponded records them). Exits 1, naming
    the first bad seq, if a stored event was changed or cannot be read."""
    log = reader(bus, db)
    shown = show_session(log, resolve(log, session))
    output.answer(f"session {shown.session_id}")
    parent, depth = parent_of(log, shown.session_id)
    if parent:
        output.answer(f"child of {parent} (depth {depth})")
    models = answered_by(shown.events)
    if models:  # SessionStarted names the model asked for (on Kafka, often `default`): this answered
        output.answer(f"answered by {', '.join(short(m, 60) for m in models)}")
    output.table(["seq", "time", "type", "actor", "payload"],
                 [(e.seq, clock(e.time), e.type, e.actor, summarize(e, width)) for e in shown.events])
    tree = tree_lines(log, shown.session_id)
    if tree:
        output.answer("children:")
        for line in tree:
            output.answer(line)
    if not shown.ok:
        output.error(f"session {shown.session_id} fails verification: {shown.problem}")
        raise typer.Exit(1)


def clock(ms: int, date: bool = False) -> str:
    try:
        t = dt.datetime.fromtimestamp(ms / 1000)
    except (OverflowError, OSError, ValueError):
        return str(ms)
    return t.strftime("%Y-%m-%d %H:%M:%S") if date else t.strftime("%H:%M:%S.%f")[:-3]

