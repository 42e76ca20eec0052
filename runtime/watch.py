"""Cancel reaches work in flight: while a handler runs for a session, a watcher thread reads
that session's head in the log and, when an event that ends it appears (a person's
SessionCancelled, another process's SessionFailed), cancels the handler's token
(core/cancel.py). Both drivers run every handler under `EndWatcher.guard` (through
`runtime/dispatch.py`); docs/architecture.md#cancelling-work-in-flight.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from loopstream.core.cancel import Cancel, scope
from loopstream.core.fsm import ANNOTATIONS, TERMINAL, TRANSITIONS
from loopstream.core.log import Log

logger = logging.getLogger("loopstream.watch")

ENDS_SESSION = frozenset(trigger for trigger, _, dest, _ in TRANSITIONS if dest in TERMINAL and trigger not in ANNOTATIONS)


@dataclass(eq=False)
class _Watched:
    session_id: str
    seen: int  # the session's next seq when the handler started: later events are someone else's
    token: Cancel = field(default_factory=Cancel)


class EndWatcher:
    """Watches the sessions that have a handler in flight, every `interval` seconds, with
    one thread that runs only while some handler does. A poll costs one `log.next_seq` per
    watched session, and a read of the new events only when the session moved."""

    def __init__(self, log: Log, interval: float = 0.25) -> None:
        self.log = log
        self.interval = interval
        self._lock = threading.Lock()
        self._watched: set[_Watched] = set()
        self._thread: threading.Thread | None = None

    @contextmanager
    def guard(self, session_id: str, next_seq: int) -> Iterator[Cancel]:
        """Run the block under a fresh token (the current one, `core.cancel.scope`), cancelled
        when an event ending `session_id` is appended after `next_seq` by anyone."""
        entry = _Watched(session_id, next_seq)
        with self._lock:
            self._watched.add(entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="loopstream-watch")
                self._thread.start()
        try:
            with scope(entry.token) as token:
                yield token
        finally:
            with self._lock:
                self._watched.discard(entry)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                if not self._watched:
                    self._thread = None  # the next guard starts another
                    return
                watched = list(self._watched)
            for entry in watched:
                self._poll(entry)

    def _poll(self, entry: _Watched) -> None:
        if entry.token.cancelled:
            return
        try:
            head = self.log.next_seq(entry.session_id)
            if head <= entry.seen:
                return
            events = self.log.read(entry.session_id, entry.seen)
        except Exception as exc:  # a log closing under us, a broker away: try again next time
            logger.debug("watching session %s: %s", entry.session_id, exc)
            return
        entry.seen = events[-1].seq + 1 if events else head
        end = next((e for e in events if e.type in ENDS_SESSION), None)
        if end is not None:
            reason = getattr(end.payload, "reason", "")
            entry.token.cancel(f"session {entry.session_id}: {end.type} by {end.actor}"
                               + (f": {reason}" if reason else ""))
