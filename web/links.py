"""Which session came from which: the links the tree of sessions is drawn from.

A link is read from one event. `LINKERS` maps an event type to a function that turns such
an event into a `Link` (child, parent, where in the parent, what kind); a fork's
`SessionForked` is one, and any other kind of child session (a sub-agent) adds its event
type here. The tree view knows nothing else about them."""
from __future__ import annotations

import threading
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


def _child(e: ev.Event) -> Link | None:
    """A sub-agent: its SessionStarted names the parent session (docs/subagents.md)."""
    p = e.payload
    if isinstance(p, ev.SessionStarted) and p.parent_session_id:
        return Link(e.session_id, p.parent_session_id, None, "subagent")
    return None


LINKERS: dict[str, Linker] = {"SessionForked": _forked, "SessionStarted": _child}


def events_of_types(log: Log, types: Iterable[str], after_gpos: int = 0) -> tuple[list[ev.Event], int]:
    """Every event of `types` in the log, and the log position read up to: a SQLite log finds
    them by its type column, from `after_gpos` on (so a caller can read only what is new);
    another log is read whole, session by session. Unreadable events are skipped."""
    wanted = sorted(set(types))
    if isinstance(log, SQLiteLog):
        marks = ",".join("?" for _ in wanted) or "NULL"
        with log.snapshot() as conn:
            (top,) = conn.execute("SELECT coalesce(max(gpos), 0) FROM events").fetchone()
            rows = conn.execute(f"SELECT data FROM events WHERE gpos > ? AND gpos <= ? AND type IN ({marks}) "
                                "ORDER BY gpos", [after_gpos, top, *wanted]).fetchall()
        raws = [r[0] for r in rows]
    else:
        top = 0
        raws = [raw for info in log.sessions() for raw in log.read_raw(info.session_id)] if wanted else []
    out = []
    for raw in raws:
        try:
            e = decode(raw or b"")
        except Exception:  # noqa: BLE001 - a damaged event is `show`'s to report, not the tree's
            continue
        if e.type in wanted:
            out.append(e)
    return out, top


class Links:
    """child session -> its link to its parent: the last one in log order (a fork of a fork
    carries its parent's copied SessionForked before its own). `read(log)` brings it up to
    date, reading only the events appended since the last call (on SQLite)."""

    def __init__(self, linkers: Mapping[str, Linker] = LINKERS) -> None:
        self.linkers = dict(linkers)
        self._found: dict[str, Link] = {}
        self._read_to = 0
        self._lock = threading.Lock()

    def read(self, log: Log) -> dict[str, Link]:
        with self._lock:
            events, top = events_of_types(log, self.linkers, self._read_to)
            if not isinstance(log, SQLiteLog):
                self._found = {}
            for e in events:
                link = self.linkers[e.type](e)
                if link is not None and link.child != link.parent:
                    self._found[link.child] = link
            self._read_to = max(self._read_to, top)
            return dict(self._found)


def links(log: Log, linkers: Mapping[str, Linker] = LINKERS) -> dict[str, Link]:
    """Every child's link to its parent, read from the whole log."""
    return Links(linkers).read(log)


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
