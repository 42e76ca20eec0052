"""The dispatch rule both drivers share: a processor is called for an event only when the
fold says that event's handling is owed (`core.state.open_work`), and only the processors
acting for the actor that owes it (`Processor.acts_for`, the FSM table's `owed_by`).

Every handler runs under the `EndWatcher`'s guard when the driver gives one: if the session
is ended by someone else meanwhile, the handler's I/O is stopped and nothing it returns is
written (`Written.outcome == "interrupted"`)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

from loopstream.core import events as ev
from loopstream.core.cancel import Interrupted
from loopstream.core.fsm import IllegalTransition
from loopstream.core.processor import Emit, Observer, Processor
from loopstream.core.state import Owed, SessionState, open_work
from loopstream.runtime.watch import EndWatcher
from loopstream.runtime.writer import SessionWriter, Written


class Dispatch:
    """Processors grouped by the actor they act for, plus observers (no `acts_for`)."""

    def __init__(self, processors: Sequence[Processor | Observer | Any], watcher: EndWatcher | None = None) -> None:
        self.processors: list[Processor] = [p for p in processors if getattr(p, "acts_for", None)]
        self.observers: list[Observer] = [p for p in processors if not getattr(p, "acts_for", None)]
        self.actors = frozenset(p.acts_for for p in self.processors)
        self.triggers = frozenset().union(*(p.triggers for p in processors)) if processors else frozenset()
        self.watcher = watcher

    def work(self, state: SessionState) -> list[Owed]:
        """The owed items of `state` that a processor here acts for, in open_work's order."""
        return [o for o in open_work(state) if o.actor in self.actors]

    def owed(self, state: SessionState, seq: int) -> Owed | None:
        """The owed item for the event at `seq` that a processor here acts for, else None
        (a redelivered event that is answered, an event no one owes, another actor's)."""
        return next((o for o in self.work(state) if o.seq == seq), None)

    def act(self, writer: SessionWriter, state: SessionState, item: Owed, event: ev.Event,
            now_ms: int) -> list[Written]:
        """Hand the owed `item` (its `event`) to the processors acting for it, in order; the
        first that emits has its emits written, then the work an emit announces (`Emit.then`)
        done once it is in the log. The writes made; none if no processor emitted; the last
        one "interrupted" if the session was ended by someone else while a handler ran."""
        for proc in self.processors:
            if proc.acts_for != item.actor or event.type not in proc.triggers:
                continue
            try:
                emits = self.guarded(state, lambda p=proc: p.handle(event, state, now_ms))
            except Interrupted:
                return [Written(writer.refresh(state), [], "interrupted")]
            if emits:
                return self._write(writer, state, item, event, emits, proc.name)
        return []

    def guarded(self, state: SessionState, work: Callable[[], Any]) -> Any:
        """`work()` under the watcher's guard for `state`'s session (Interrupted if it ends)."""
        with self.watcher.guard(state.session_id, state.next_seq) if self.watcher else nullcontext():
            return work()

    def _write(self, writer: SessionWriter, state: SessionState, item: Owed, cause: ev.Event, emits: list[Emit],
               actor: str) -> list[Written]:
        try:
            written = [writer.emit(state, item, cause, emits, actor)]
        except IllegalTransition as exc:  # a bug in the processor: never stored
            raise RuntimeError(f"{actor} emitted an illegal batch for seq {cause.seq}: {exc}") from exc
        first = written[0]
        announced = next(((e, i) for i, e in enumerate(emits) if e.then is not None), None)
        if first.appended and announced is not None:  # only the writer that appended it does the work
            emit, i = announced
            marker = first.events[i]
            try:
                more = self.guarded(first.state, lambda: emit.then(writer.clock()))
            except Interrupted:
                return written + [Written(writer.refresh(first.state), [], "interrupted")]
            if more:
                written += self._write(writer, first.state, Owed(marker.seq, item.actor), marker, more, actor)
        return written
