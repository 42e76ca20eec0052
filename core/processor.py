"""What a processor is: a plain handler, event in, events out.

`handle(event, state, now_ms)` gets one event whose handling is owed (the driver calls it
only then, see `core.state.open_work`), the session's state folded up to the log's head,
and the clock, and returns `Emit`s. It does no log I/O itself and keeps no decision in
memory: a driver turns emits into events with ids derived from the causing event
(`runtime/writer.py`), so a handler run twice for the same event writes the same fact
twice and the log keeps one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from loopstream.core.events import Event, Payload
from loopstream.core.state import SessionState


@dataclass(frozen=True)
class Emit:
    """One event a handler wants appended (the driver builds its envelope)."""

    payload: Payload
    key: str = ""  # distinguishes several emits of one type from one cause (e.g. call id)
    # Work announced by this event, done only once the event is in the log and only by the
    # writer that appended it (a side-effect tool runs right after its WorkspaceCheckpointed):
    # called with the clock, its emits are appended with this event as their cause.
    then: Callable[[int], list[Emit]] | None = field(default=None, compare=False)


class Processor(Protocol):
    name: str  # recorded as the `actor` of what it emits
    acts_for: str  # the actor of the FSM table whose owed work it does (core.fsm.owed_by)
    triggers: frozenset[str]  # the event types whose handling it may owe

    def handle(self, event: Event, state: SessionState, now_ms: int) -> list[Emit]:
        """What to append for `event`, which is owed to `acts_for` and due at `now_ms`."""
        ...


class Observer(Protocol):
    """Sees each delivered event of its triggers with the state at the log's head and
    writes nothing (a results publisher, a projection): a worker calls it whether or not
    the event is owed. A processor is told apart from an observer by its `acts_for`."""

    name: str
    triggers: frozenset[str]

    def handle(self, event: Event, state: SessionState) -> list[Emit]: ...
