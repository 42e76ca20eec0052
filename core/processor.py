"""What a processor is: a plain handler, event in, events out.

`handle(event, state)` gets one event and the session's state folded up to the log's
head, and returns `Emit`s. It does no log I/O itself: the runtime (in-process over
SQLite, or a worker over Kafka) turns emits into events with deterministic ids derived
from the causing event, so a handler run twice for the same event writes the same
fact twice and the log keeps one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from loopstream.core.events import Event, Payload
from loopstream.core.state import SessionState


@dataclass(frozen=True)
class Emit:
    payload: Payload
    key: str = ""  # distinguishes several emits of one type from one cause (e.g. call id)


class Processor(Protocol):
    name: str  # recorded as the `actor` of what it emits
    triggers: frozenset[str]  # event types it handles

    def handle(self, event: Event, state: SessionState) -> list[Emit]: ...
