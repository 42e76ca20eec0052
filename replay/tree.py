"""Trees of sessions (docs/subagents.md): a session's children are named by its
ChildrenStarted events and linked back by their SessionStarted (v4); this reads both, for
`show`, `replay`, `replay --check` and `sessions`."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from loopstream.core import events as ev
from loopstream.core.codec import decode_prefix
from loopstream.core.describe import short
from loopstream.core.log import Log
from loopstream.core.state import fold


@dataclass(frozen=True)
class Child:
    """One child a session started: where (the delegate call, the index asked), and what it is now."""

    session_id: str
    call_id: str
    index: int
    agent: str
    task: str
    status: str  # the child's state now: done, failed, cancelled, awaiting_approval, …, or "not started"
    waits_for_person: bool = False


def children(log: Log, events: Sequence[ev.Event]) -> list[Child]:
    """The children named by `events` (one session's), in the order they were started."""
    out = []
    for e in events:
        if isinstance(e.payload, ev.ChildrenStarted):
            for i, c in enumerate(e.payload.children):
                status, waits = _status(log, c.session_id)
                out.append(Child(c.session_id, e.payload.call_id, i, c.agent, c.task, status, waits))
    return out


def _readable(log: Log, session_id: str) -> list[ev.Event]:
    """The session's events up to the first that cannot be read (a damaged log never fails a listing)."""
    events, _ = decode_prefix(log.read_raw(session_id))
    return events


def _status(log: Log, session_id: str) -> tuple[str, bool]:
    events = _readable(log, session_id)
    if not events:
        return ("not started" if not log.next_seq(session_id) else "unreadable"), False
    try:
        state = fold(events)
    except ValueError as exc:  # a damaged child: say so, never fail the parent's listing
        return f"unreadable ({exc})", False
    return state.status, bool(state.open_approvals)


def parent_of(log: Log, session_id: str) -> tuple[str | None, int]:
    """The session's parent (SessionStarted v4) and its depth; (None, 0) at the top."""
    events, _ = decode_prefix(log.read_raw(session_id, 0, 0))
    if events and isinstance(events[0].payload, ev.SessionStarted):
        return events[0].payload.parent_session_id, events[0].payload.depth
    return None, 0


def descendants(log: Log, session_id: str, depth: int = 0, max_depth: int = 32) -> Iterator[tuple[int, Child]]:
    """Every session below `session_id`, depth first, with its depth under it (1: a child)."""
    if depth >= max_depth:
        return
    for child in children(log, _readable(log, session_id)):
        yield depth + 1, child
        if child.status != "not started":
            yield from descendants(log, child.session_id, depth + 1, max_depth)


def tree_lines(log: Log, session_id: str, width: int = 70) -> list[str]:
    """The tree under `session_id`, one line per child, indented by depth; [] without children."""
    lines = []
    for depth, c in descendants(log, session_id):
        waits = f" — waits for a person: loopstream approve {c.session_id}" if c.waits_for_person else ""
        lines.append(f"{'  ' * depth}└ {c.session_id} [{c.status}] agent={c.agent} call {c.call_id}#{c.index}: "
                     f"{short(c.task, width)}{waits}")
    return lines
