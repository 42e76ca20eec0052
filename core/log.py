"""The log interface every backend implements (SQLite embedded, Kafka distributed).

Contract (tests/log_conformance.py checks it against each backend):
- `append(session_id, events, expected_seq)`: the events must carry seqs expected_seq,
  expected_seq+1, …; if the session's next seq is not `expected_seq`, nothing is written
  and `ConcurrencyError` is raised. If an event's id is already stored (the first event's,
  typically), nothing is written and `DuplicateEvent` is raised (a retried handler wrote
  the same fact again); the duplicate check comes before the seq check. A batch is atomic.
- `read(session_id, from_seq=0, to_seq=None)`: events in seq order, `to_seq` inclusive.
- `read_raw(...)`: the same as stored bytes (for hashing and copying).
- `sessions()`: one `SessionInfo` per session.
- `subscribe(group)`: a named consumer group over all sessions that resumes from its
  last committed position after a restart (at-least-once: commit after handling).

A backend may also offer forks by reference (`LinkingLog`: the SQLite log does, the Kafka
log does not, and a fork there copies the prefix): `append_linked(child, parent, parent_seq,
events)` starts `child` whose seqs 0..parent_seq read as the parent's stored events, then
`events`; every read of the child (`read`, `read_raw`, `next_seq`) sees that whole history.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from loopstream.core.events import Event


class LogError(RuntimeError):
    pass


class LogLost(LogError):
    """The log's storage lost records it had acknowledged (a Kafka broker that lost its state,
    a topic recreated): nothing may be read or appended until it is restored. Workers stop
    taking work and wait; retrying cannot help (docs/kafka.md#broker-state-loss)."""


class ConcurrencyError(LogError):
    def __init__(self, session_id: str, expected: int, actual: int) -> None:
        super().__init__(
            f"session {session_id}: append expected next seq {expected}, but the log is at {actual}"
        )
        self.session_id, self.expected, self.actual = session_id, expected, actual


class DuplicateEvent(ConcurrencyError):
    def __init__(self, session_id: str, event_id: str, expected: int, actual: int) -> None:
        super().__init__(session_id, expected, actual)
        self.args = (f"session {session_id}: event {event_id} is already in the log",)
        self.event_id = event_id


class SessionNotFound(LogError, KeyError):
    def __str__(self) -> str:
        return f"no session {self.args[0]!r} in this log"


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    created_ms: int
    updated_ms: int
    next_seq: int
    last_type: str


@dataclass(frozen=True)
class Delivery:
    """One event handed to a subscriber; `position` is backend-specific (commit it back)."""

    event: Event
    position: Any


class Subscription(Protocol):
    def poll(self, max_events: int = 100, timeout: float = 1.0) -> list[Delivery]: ...
    def commit(self, delivery: Delivery) -> None: ...
    def close(self) -> None: ...


class Log(Protocol):
    def append(self, session_id: str, events: Sequence[Event], expected_seq: int) -> None: ...
    def read(self, session_id: str, from_seq: int = 0, to_seq: int | None = None) -> list[Event]: ...
    def read_raw(
        self, session_id: str, from_seq: int = 0, to_seq: int | None = None
    ) -> list[bytes]: ...
    def next_seq(self, session_id: str) -> int: ...
    def sessions(self) -> list[SessionInfo]: ...
    def subscribe(self, group: str) -> Subscription: ...
    def close(self) -> None: ...


class LinkingLog(Log, Protocol):
    """A log whose forks refer to their parent's prefix instead of copying it (see the module doc)."""

    def append_linked(self, session_id: str, parent_session_id: str, parent_seq: int,
                      events: Sequence[Event]) -> None: ...


def can_link(log: Log) -> bool:
    """Whether `log` stores forks by reference (`LinkingLog`)."""
    return callable(getattr(log, "append_linked", None))


def check_batch(session_id: str, events: Sequence[Event], expected_seq: int) -> None:
    """Shared precondition of every backend's append: a non-empty, gapless batch."""
    if not events:
        raise ValueError("append needs at least one event")
    for i, e in enumerate(events):
        if e.session_id != session_id:
            raise ValueError(f"event {e.event_id} belongs to session {e.session_id}, not {session_id}")
        if e.seq != expected_seq + i:
            raise ValueError(f"event {e.event_id} has seq {e.seq}, expected {expected_seq + i}")
    if len({e.event_id for e in events}) != len(events):
        raise ValueError("a batch repeats an event id")
