"""The in-process driver: runs sessions over a log (SQLite by default) in this process.

It only moves events: it folds a session, takes the owed work (`runtime/dispatch.py`),
waits for the clock when nothing is due yet, and lets the session writer append what
the processors emit. Working from the log alone, a driver killed at any point and
started again continues where the log stands (docs/architecture.md#the-runtime).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from loopstream.core import events as ev
from loopstream.core.log import Log
from loopstream.core.processor import Processor
from loopstream.core.secrets import Secrets
from loopstream.core.state import Owed, SessionState, open_work
from loopstream.runtime.dispatch import Dispatch
from loopstream.runtime.watch import EndWatcher
from loopstream.runtime.writer import Clock, EventCallback, SessionConfig, SessionWriter, Written

__all__ = ["EventCallback", "Runtime", "RuntimeStuck", "SessionConfig"]

WATCH_S = 0.25  # how often a waiting driver looks at the log for a session ended elsewhere


class RuntimeStuck(RuntimeError):
    """Owed work that nobody here does, or a session that did not end within its budget."""


class Runtime:
    """Drive sessions in-process with `processors`; every write goes through `writer`."""

    def __init__(self, log: Log, processors: Sequence[Processor], on_event: EventCallback | None = None, *,
                 secrets: Secrets = (), clock: Clock = ev.now_ms,
                 sleep: Callable[[float], None] = time.sleep, writer: SessionWriter | None = None) -> None:
        self.log = log
        self.writer = writer or SessionWriter(log, secrets=secrets, on_event=on_event, clock=clock)
        self.dispatch = Dispatch(processors, EndWatcher(log, WATCH_S))  # a session ended elsewhere stops its handler
        self.sleep = sleep
        self._recent: dict[tuple[str, int], ev.Event] = {}  # the last batch written: the next owed event
        for proc in self.dispatch.processors:  # a child runner (runtime/children.py) runs children here
            if hasattr(proc, "attach"):
                proc.attach(self)

    @property
    def processors(self) -> list[Processor]:
        return self.dispatch.processors

    def start_session(self, goal: str, config: SessionConfig, *, session_id: str | None = None,
                      correlation_id: str | None = None, idempotency_key: str | None = None, actor: str = "cli",
                      reply_topic: str | None = None) -> str:
        """Start a session through the writer (`SessionWriter.start`); its id."""
        return self.writer.start(goal, config, session_id=session_id, correlation_id=correlation_id,
                                 idempotency_key=idempotency_key, actor=actor, reply_topic=reply_topic)

    def load(self, session_id: str) -> SessionState:
        return self.writer.load(session_id)

    def run_session(self, session_id: str, max_events: int = 100_000) -> SessionState:
        """Drive one session until it ends or waits for input (a goal, a person's decision)."""
        state = self.load(session_id)
        for _ in range(max_events):
            work = self.dispatch.work(state)
            if state.terminal and not work:  # ended (its SessionEnd hooks, if any, have decided here)
                return state
            if not work:
                others = [o for o in open_work(state) if o.actor != "person"]
                if others:
                    raise RuntimeStuck(f"session {session_id}: no processor here acts for {others}")
                return state  # idle, or waiting for a person: nothing to do until an event arrives
            now = self.writer.clock()
            due = [o for o in work if o.due(now)]
            if not due:  # waiting on the clock (a retry's backoff)
                state = self._wait_until(state, min(o.not_before_ms or now for o in work), now)
                continue
            written = next((w for o in due if (w := self.act(state, o, now))), None)
            if written is None:
                raise RuntimeStuck(f"session {session_id}: no processor acted on the owed {due} "
                                   f"in state {state.status!r}")
            state = written[-1].state
        raise RuntimeStuck(f"session {session_id} did not finish within {max_events} dispatches")

    def _wait_until(self, state: SessionState, due_ms: int, now_ms: int) -> SessionState:
        """Sleep until `due_ms`, in slices of at most WATCH_S: a session that moves meanwhile
        (a person cancels it) is seen at once; the state as the log has it then."""
        left = max(0, due_ms - now_ms) / 1000 + 0.001
        while left > 0:
            self.sleep(min(left, WATCH_S))
            left -= WATCH_S
            if self.log.next_seq(state.session_id) != state.next_seq:
                return self.writer.refresh(state)
        return state

    def act(self, state: SessionState, item: Owed, now_ms: int) -> list[Written]:
        """Dispatch one owed item at `now_ms`; the writes made (none if no processor emitted)."""
        event = self._recent.get((state.session_id, item.seq))
        if event is None:
            (event,) = self.log.read(state.session_id, item.seq, item.seq)
        written = self.dispatch.act(self.writer, state, item, event, now_ms)
        if written:
            self._recent = {(e.session_id, e.seq): e for w in written for e in w.events}
            for w in written if self.dispatch.observers else ():  # they see what was written, as on a worker
                for e in w.events:
                    for observer in self.dispatch.observers:
                        if e.type in observer.triggers:
                            observer.handle(e, w.state)
        return written
