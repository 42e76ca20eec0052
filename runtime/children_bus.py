"""Sub-agents under the subscription driver (`runtime/worker.py`, over Kafka or SQLite):
the children run as ordinary sessions on whichever workers take them (docs/subagents.md).

- `ChildCoordinator` acts for `children` on a delegation's owed event (its ChildrenStarted,
  or its latest ChildSettled): it starts the children not in the log yet (`SessionWriter.start`
  with the ids the ChildrenStarted names: starting twice writes nothing) and reports the ones
  that have ended (`settle`): ChildSettled for each, and once the aggregation is decided the
  children no longer needed cancelled and the call's ToolCompleted. With nothing new it emits
  nothing: the item stays owed.
- `ChildWatcher` observes the end of every session: a child's SessionFinished / Failed /
  Cancelled makes it report that child to its parent, through the session writer, as the owed
  work of the parent's delegation (a parent moved meanwhile by another child's report: done
  again on the new head; a report already written: a duplicate, nothing written).

So a redelivered event, a restarted worker or two children ending at once each write every
fact once: what is settled is in the parent's fold, and ids derive from the cause."""
from __future__ import annotations

import time
from collections.abc import Mapping

from loopstream.core import events as ev
from loopstream.core.fsm import TERMINAL
from loopstream.core.log import Log, SessionNotFound
from loopstream.core.processor import Emit
from loopstream.core.state import Delegation as Open
from loopstream.core.state import Owed, SessionState
from loopstream.processors.delegation import completed, decided, settled_event
from loopstream.runtime.children import ChildRunner, Resolve
from loopstream.runtime.writer import SessionConfig, SessionWriter

ENDS = frozenset({"SessionFinished", "SessionFailed", "SessionCancelled"})


class ChildCoordinator:
    name = "children"
    acts_for = "children"
    triggers = frozenset({"ChildrenStarted", "ChildSettled"})

    def __init__(self, log: Log, agents: Mapping[str, SessionConfig] | Resolve | None = None) -> None:
        self.log = log
        self.writer = SessionWriter(log)
        self.configs = ChildRunner(agents)  # only its config_for: what a child starts with

    def handle(self, event: ev.Event, state: SessionState, now_ms: int) -> list[Emit]:
        d = next((d for d in state.delegations.values() if d.owed_seq == event.seq), None)
        if d is None:
            return []
        settled = {s.index for s in d.settled}
        for i, child in enumerate(d.children):
            if i not in settled and not self.log.next_seq(child.session_id):
                config = self.configs.config_for(child.agent, state, d, now_ms, child.task)
                if config is not None:  # an unknown agent is reported by `settle`
                    self.writer.start(child.task, config, session_id=child.session_id,
                                      correlation_id=state.correlation_id, actor=f"parent:{state.session_id}")
        return self.settle(state, d)

    def settle(self, parent: SessionState, d: Open) -> list[Emit]:
        """The reports owed for `d` now: ChildSettled for each child that ended since, and, once
        the aggregation is decided, those no longer needed (cancelled) and the ToolCompleted."""
        started = time.monotonic()
        before = {s.index: s for s in d.settled}
        new: dict[int, ev.ChildSettled] = {}
        for i, child in enumerate(d.children):
            if i in before:
                continue
            state = self._load(child.session_id)
            if state is None and self.configs.config_for(child.agent, parent, d, 0, child.task) is None:
                new[i] = settled_event(d, i, "failed", f"unknown agent {child.agent!r}: the worker has no "
                                                        f"definition for it")
            elif state is not None and state.status in TERMINAL:
                new[i] = ChildRunner._from_state(d, i, state)
        if decided(d, {**before, **new}):
            for i, child in enumerate(d.children):
                if i in before or i in new:
                    continue
                state = self._load(child.session_id)
                if state is not None and not state.terminal:
                    self.writer.record(child.session_id, [ev.SessionCancelled(
                        reason="no longer needed: the delegation is decided")], "children")
                    state = self._load(child.session_id)
                new[i] = (ChildRunner._from_state(d, i, state) if state is not None else
                          settled_event(d, i, "cancelled", "not needed: the delegation was decided without it"))
            name = parent.pending_calls[d.call_id].call.name if d.call_id in parent.pending_calls else "delegate"
            tail = [Emit(completed(d, name, {**before, **new}, started), key=d.call_id)]
        else:
            tail = []
        return [*(Emit(s, key=str(s.index)) for s in sorted(new.values(), key=lambda s: s.index)), *tail]

    def _load(self, session_id: str) -> SessionState | None:
        try:
            return self.writer.load(session_id)
        except SessionNotFound:
            return None


class ChildWatcher:
    """An observer of session ends that reports a child's end to its parent (see the module doc).
    Unlike other observers it writes, to the parent, through the session writer."""

    name = "children-watch"
    triggers = ENDS

    def __init__(self, coordinator: ChildCoordinator, attempts: int = 8) -> None:
        self.coordinator = coordinator
        self.attempts = attempts

    def handle(self, event: ev.Event, state: SessionState) -> list[Emit]:
        if not state.parent_session_id or not state.terminal:
            return []
        log, writer = self.coordinator.log, self.coordinator.writer
        for _ in range(self.attempts):
            try:
                parent = writer.load(state.parent_session_id)
            except SessionNotFound:
                return []
            d = next((d for d in parent.delegations.values()
                      if any(c.session_id == state.session_id for c in d.children)), None)
            if d is None or any(s.session_id == state.session_id for s in d.settled):
                return []  # reported already, or the delegation is over
            emits = self.coordinator.settle(parent, d)
            if not emits:
                return []
            (cause,) = log.read(parent.session_id, d.owed_seq, d.owed_seq)
            written = writer.emit(parent, Owed(d.owed_seq, "children"), cause, emits, "children")
            if written.outcome != "dropped":  # appended, or a duplicate: the facts are in the log
                return []
        return []
