"""Which session came from which: the links the tree of sessions is drawn from.

A link is read from one event. `LINKERS` maps an event type to a function that turns such
an event into a `Link` (child, parent, where in the parent, what kind); a fork's
`SessionForked` is one, and any other kind of child session (a sub-agent) adds its event
type here. The tree view knows nothing else about them."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from loopstream.core import events as ev
from loopstream.core.codec import decode
from loopstream.core.log import Log
from loopstream.core.sqlite_log import SQLiteLog


@dataclass(frozen=True)
class Link:
    child: str
    parent: str
    parent_seq: int | None  # the parent's event the child starts from (None: not known)
    kind: str  # "fork", "subagent", …


Linker = Callable[[ev.Event], "Link | None"]


def _forked(e: ev.Event) -> Link | None:
    p = e.payload
    return Link(e.session_id, p.parent_session_id, p.parent_seq, "fork") if isinstance(p, ev.SessionForked) else None


LINKERS: dict[str, Linker] = {"SessionForked": _forked}


def events_of_types(log: Log, types: Iterable[str]) -> list[ev.Event]:
    """Every event of `types` in the log (a SQLite log finds them by its type column; another
    log is read session by session). Unreadable events are skipped."""
    wanted = sorted(set(types))
    if not wanted:
        return []
    if isinstance(log, SQLiteLog):
        marks = ",".join("?" for _ in wanted)
        with log.snapshot() as conn:
            rows = conn.execute(f"SELECT data FROM events WHERE type IN ({marks}) ORDER BY gpos", wanted).fetchall()
        raws = [r[0] for r in rows]
    else:
        raws = [raw for info in log.sessions() for raw in log.read_raw(info.session_id)]
    out = []
    for raw in raws:
        try:
            e = decode(raw or b"")
        except Exception:  # noqa: BLE001 - a damaged event is `show`'s to report, not the tree's
            continue
        if e.type in wanted:
            out.append(e)
    return out


def links(log: Log, linkers: Mapping[str, Linker] = LINKERS) -> dict[str, Link]:
    """child session -> its link to its parent: the last one in log order (a fork of a fork
    carries its parent's copied SessionForked before its own)."""
    out: dict[str, Link] = {}
    for e in events_of_types(log, linkers):
        link = linkers[e.type](e)
        if link is not None and link.child != link.parent:
            out[link.child] = link
    return out


def family(found: Mapping[str, Link], session_id: str) -> tuple[str, dict[str, list[Link]]]:
    """The root of `session_id`'s tree and every parent's children (in that tree) in order found."""
    root, seen = session_id, {session_id}
    while root in found and found[root].parent not in seen:  # a cycle (a damaged log) stops the climb
        root = found[root].parent
        seen.add(root)
    children: dict[str, list[Link]] = {}
    for link in found.values():
        children.setdefault(link.parent, []).append(link)
    return root, children
