"""The child runner: the driver's half of sub-agents (docs/subagents.md).

It acts for `children` (core/fsm.py: the awaiting_children state) on a delegation's
ChildrenStarted (or its latest ChildSettled): it starts each child session that is not in
the log yet (`SessionWriter.start` with the id the ChildrenStarted names: starting twice
writes nothing), drives the unfinished ones in parallel on a bounded pool with the same
runtime (a child waiting for a person's approval waits here until someone decides, from any
process), and once the aggregation is decided (processors/delegation.py) stops the children
no longer needed and returns the ChildSettled events, in the order asked, then the call's
ToolCompleted. A child that ended before (a crash and resume, a fork after the delegation)
is read from the log, never run again. If the parent is cancelled while its children run,
they are cancelled too.

It is not a processor: it runs sessions (I/O), so it lives with the drivers; what it writes
is decided by the children's own logs and the pure aggregation rules."""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from loopstream.core import cancel
from loopstream.core import events as ev
from loopstream.core.log import SessionNotFound
from loopstream.core.processor import Emit
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import Delegation as Open
from loopstream.core.state import SessionState
from loopstream.processors.budgets import cost_usd, remaining_seconds, remaining_tokens
from loopstream.processors.delegation import completed, decided, settled_event
from loopstream.runtime import lease
from loopstream.runtime.writer import SessionConfig

if TYPE_CHECKING:
    from loopstream.runtime.inline import Runtime

POLL_S = 0.05  # how often a waiting child (a person's approval) or the parent looks at the log
Resolve = Callable[[str, str], SessionConfig | None]  # (agent name, task) -> its configuration, None: unknown


class ChildRunner:
    """Runs the children of a session's delegations with the runtime it is attached to.
    `agents`: the named agent definitions a child may run as, a mapping or a function of
    (name, task) (the CLI composes them from loopstream.toml); a child of the parent's own
    agent runs with the parent's recorded configuration. A child runs with this runtime's
    processors, so with its tools."""

    name = "children"
    acts_for = "children"
    triggers = frozenset({"ChildrenStarted", "ChildSettled"})

    def __init__(self, agents: Mapping[str, SessionConfig] | Resolve | None = None) -> None:
        self.agents = agents if callable(agents) else dict(agents or {})
        self.runtime: Runtime | None = None

    def attach(self, runtime: Runtime) -> None:
        """Called by the runtime this runner's children run on (the first one wins)."""
        if self.runtime is None:
            self.runtime = runtime

    # -- the handler --------------------------------------------------------------------
    def handle(self, event: ev.Event, state: SessionState, now_ms: int) -> list[Emit]:
        if self.runtime is None:
            raise RuntimeError("ChildRunner: not attached to a runtime")
        d = next((d for d in state.delegations.values() if d.owed_seq == event.seq), None)
        if d is None:
            return []
        started = time.monotonic()
        settled = {s.index: s for s in d.settled}
        new = self._run(d, state, settled, now_ms)
        name = state.pending_calls[d.call_id].call.name if d.call_id in state.pending_calls else "delegate"
        emits = [Emit(s, key=str(s.index)) for s in sorted(new.values(), key=lambda s: s.index)]
        return [*emits, Emit(completed(d, name, {**settled, **new}, started), key=d.call_id)]

    def _run(self, d: Open, parent: SessionState, settled: dict[int, ev.ChildSettled],
             now_ms: int) -> dict[int, ev.ChildSettled]:
        """Drive the unsettled children until the aggregation is decided; their results.

        At most `[delegation] max_parallel` run at once, each on a daemon thread started only
        while the delegation is undecided (a process that dies or is stopped takes them along:
        the log says where each child stands)."""
        rt = self.runtime
        new: dict[int, ev.ChildSettled] = {}
        waiting = [i for i in range(len(d.children)) if i not in settled]
        width = max(1, parent.policy.delegation.max_parallel)
        stop, token, reports = threading.Event(), cancel.current(), queue.Queue()
        running: set[int] = set()

        def drive(i: int) -> None:
            try:
                reports.put((i, self._child(d, i, parent, now_ms, stop), None))
            except BaseException as exc:  # reported to the handler's thread, which raises it
                reports.put((i, None, exc))

        def collect(timeout: float) -> None:
            try:
                i, result, exc = reports.get(timeout=timeout)
            except queue.Empty:
                return
            running.discard(i)
            if exc is not None:
                raise exc
            if result is not None:
                new[i] = result

        try:
            while (waiting or running) and not decided(d, {**settled, **new}):
                while waiting and len(running) < width:
                    i = waiting.pop(0)
                    running.add(i)
                    threading.Thread(target=drive, args=(i,), daemon=True,
                                     name=f"loopstream-child-{d.children[i].session_id}").start()
                collect(POLL_S)
                token.check()  # the parent was cancelled (or ended elsewhere): Interrupted
            stop.set()  # decided: the children still running are not needed
            for i in sorted(running):
                self._cancel(d.children[i].session_id, "no longer needed: the delegation is decided")
            while running:  # they end at once: cancelled, their handlers are interrupted
                collect(POLL_S)
                token.check()
            for i in waiting:
                new[i] = self._settled(d, i, rt, "not needed: the delegation was decided without it")
            for i in range(len(d.children)):  # a child stopped before it reported: as its log has it
                if i not in settled and i not in new:
                    new[i] = self._settled(d, i, rt, "not needed: the delegation was decided without it")
            return new
        except cancel.Interrupted:
            stop.set()
            for child in d.children:
                self._cancel(child.session_id, f"parent session {parent.session_id} ended")
            raise
        except BaseException:
            stop.set()
            raise

    def _child(self, d: Open, i: int, parent: SessionState, now_ms: int,
               stop: threading.Event) -> ev.ChildSettled | None:
        """Start child `i` if it is not in the log, drive it until it ends (waiting while a
        person is owed a decision); its ChildSettled, or None if stopped first."""
        rt = self.runtime
        child = d.children[i]
        if stop.is_set():
            return None
        if not rt.log.next_seq(child.session_id):
            config = self.config_for(child.agent, parent, d, now_ms, child.task)
            if config is None:
                return settled_event(d, i, "failed", f"unknown agent {child.agent!r}: the runner has no "
                                                     f"definition for it")
            rt.writer.start(child.task, config, session_id=child.session_id, correlation_id=parent.correlation_id,
                            actor=f"parent:{parent.session_id}")
        with self._lease(child.session_id) as mine:
            state = rt.load(child.session_id)
            while not state.terminal:
                if mine:  # else another live process drives it (`resume CHILD`): wait for it, below
                    state = rt.run_session(child.session_id)
                    if state.terminal:
                        break
                head = state.next_seq  # waits for input (a person's approval): until the log moves
                while rt.log.next_seq(child.session_id) == head:
                    if stop.wait(POLL_S):
                        return None
                state = rt.load(child.session_id)
        return self._from_state(d, i, state)

    @contextmanager
    def _lease(self, session_id: str) -> Iterator[bool]:
        """Hold the child's lease (runtime/lease.py) while this process drives it, so `sessions`
        shows it running and `resume` refuses it; False if another live process holds it."""
        log = self.runtime.log
        if not isinstance(log, SQLiteLog) or log.path is None or str(log.path) == ":memory:":
            yield True
            return
        try:
            with lease.hold(log.path, session_id):
                yield True
        except lease.LeaseHeld:
            yield False

    def _settled(self, d: Open, i: int, rt: Runtime, not_run: str) -> ev.ChildSettled:
        try:
            state = rt.load(d.children[i].session_id)
        except SessionNotFound:
            return settled_event(d, i, "cancelled", not_run)
        return self._from_state(d, i, state)

    @staticmethod
    def _from_state(d: Open, i: int, state: SessionState) -> ev.ChildSettled:
        status = state.status if state.terminal else "cancelled"
        text = state.answer if state.status == "done" else (state.error or f"ended {state.status}")
        return settled_event(d, i, status, text or "", state.input_tokens, state.output_tokens,
                             cost_usd(state), state.step)

    def _cancel(self, session_id: str, reason: str) -> None:
        rt = self.runtime
        try:
            state = rt.load(session_id)
        except SessionNotFound:
            return
        if not state.terminal:
            rt.writer.record(session_id, [ev.SessionCancelled(reason=reason)], "children")

    # -- a child's configuration ---------------------------------------------------------
    def config_for(self, agent: str, parent: SessionState, d: Open, now_ms: int,
                   task: str = "") -> SessionConfig | None:
        """What child of agent `agent` starts with: the named definition, or the parent's
        own recorded one; linked to the parent, one level deeper, its budgets no larger than
        what the parent has left."""
        if agent == parent.agent:
            base = None
        else:
            base = self.agents(agent, task) if callable(self.agents) else self.agents.get(agent)
        if base is None and agent != parent.agent:
            return None
        if base is None:
            system = parent.messages[0].content if parent.messages and parent.messages[0].role == "system" else ""
            base = SessionConfig(provider=parent.provider, model=parent.model, tools=list(parent.tools),
                                 system_prompt=system, agent=parent.agent, max_steps=parent.max_steps,
                                 workdir=parent.workdir, policy=parent.policy, sampling=parent.sampling,
                                 definition=parent.agent_json)
        budgets = {}
        if (tokens := remaining_tokens(parent)) is not None:
            budgets["max_tokens"] = max(1, min(tokens, base.policy.budgets.max_tokens or tokens))
        if (seconds := remaining_seconds(parent, now_ms)) is not None:
            budgets["max_wall_seconds"] = max(0.001, min(seconds, base.policy.budgets.max_wall_seconds or seconds))
        policy = base.policy.updated({"budgets": budgets}, "child budgets") if budgets else base.policy
        return dataclasses.replace(base, policy=policy, parent_session_id=parent.session_id,
                                   parent_event_id=d.started_id, depth=parent.depth + 1)
