"""Determinism check: would today's code make the decisions this session's log records?

For every prefix of a stored session, fold the state and ask the Orchestrator what it
would emit at that head; compare with the events the log recorded next (type and every
payload field). Model replies and tool results are taken from the log, never re-called:
only decisions are re-driven. The first divergence names the recorded seq, what the
current code expects and what was recorded.

The orchestrator reads the clock (budgets, backoff times), so each decision is re-made at
the time it was originally made: the recorded event's time (for a RetryScheduled, its
not_before_ms - delay_ms, the instant the delay was computed from). While a check runs,
`loopstream.core.events.now_ms` is swapped for that clock in this process.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from loopstream.core import events as ev
from loopstream.core.codec import CodecError, decode
from loopstream.core.fsm import IllegalTransition
from loopstream.core.log import Log, SessionNotFound
from loopstream.core.processor import Emit
from loopstream.core.secrets import cap
from loopstream.core.state import SequenceGap, SessionState, apply
from loopstream.processors.orchestrator import Orchestrator
from loopstream.replay.chain import ChainReport, verify_raw

# Events that come from outside the loop (people, goal producers): not decisions.
INPUT_TYPES = frozenset({"GoalReceived", "UserMessage", "SessionForked", "SessionCancelled", "ApprovalDecided"})


@dataclass
class Divergence:
    seq: int  # the recorded event that differs (or where the expected one is missing)
    head_seq: int  # the event the decision was made on
    state: str  # the FSM state at the head
    expected: tuple[str, dict] | None  # (type, payload) the current code emits; None: nothing
    recorded: tuple[str, dict] | None  # (type, payload) in the log; None: nothing
    fields: list[str] = field(default_factory=list)  # payload fields that differ (same type)
    reason: str = ""

    def describe(self) -> str:
        lines = [(f"first divergence at seq {self.seq} (decided at seq {self.head_seq}, state {self.state}): "
                 f"{self.reason}")]
        lines.append(f"  expected: {_show(self.expected, self.fields)}")
        lines.append(f"  recorded: {_show(self.recorded, self.fields)}")
        return "\n".join(lines)


@dataclass
class DeterminismReport:
    session_id: str
    events: int
    decisions_checked: int
    chain: ChainReport
    divergence: Divergence | None = None

    @property
    def ok(self) -> bool:
        return self.divergence is None and self.chain.ok

    def render(self) -> str:
        head = (f"determinism check of session {self.session_id}: {self.events} events, "
                f"{self.decisions_checked} decisions re-made with the current code")
        lines = [head, self.chain.describe()]
        if self.divergence is None:
            lines.append("no divergence: the current code makes every recorded decision")
        else:
            lines.append(self.divergence.describe())
        return "\n".join(lines)


def check_determinism(log: Log, session_id: str, to_seq: int | None = None) -> DeterminismReport:
    raw = log.read_raw(session_id, 0, to_seq)
    if not raw:
        raise SessionNotFound(session_id)
    return check_raw(raw, session_id)


def check_raw(raw: Sequence[bytes], session_id: str = "", orchestrator: Orchestrator | None = None) -> DeterminismReport:
    """The check over stored event bytes (only the part the chain vouches for)."""
    chain = verify_raw(raw, session_id)
    good = raw if chain.ok else raw[: chain.first_bad_seq]
    try:
        events = [decode(b) for b in good]
    except CodecError as exc:
        bad = ChainReport(session_id, "broken", len(good), None, str(exc))
        return DeterminismReport(session_id, len(good), 0, bad)
    return check_events(events, session_id, chain, orchestrator)


def check_events(
    events: Sequence[ev.Event], session_id: str = "", chain: ChainReport | None = None,
    orchestrator: Orchestrator | None = None,
) -> DeterminismReport:
    orch = orchestrator or Orchestrator()
    chain = chain or ChainReport(session_id, "unchained", len(events))
    forks = [(e.seq, e.payload.parent_session_id) for e in events if isinstance(e.payload, ev.SessionForked)]
    report = DeterminismReport(session_id or (events[0].session_id if events else ""), len(events), 0, chain)
    state = SessionState()
    n = len(events)
    for i, event in enumerate(events):
        try:
            apply(state, event)
        except (IllegalTransition, SequenceGap) as exc:
            report.divergence = Divergence(event.seq, event.seq - 1, state.status, None,
                                           (event.type, _dump(event.payload)),
                                           reason=f"the current fold rejects it: {exc}")
            return report
        if state.status not in ("planning", "acting", "backing_off") or i + 1 >= n:
            continue
        nxt = events[i + 1]
        if nxt.type in INPUT_TYPES:
            continue  # someone outside the loop spoke first: not a decision to re-make
        emits = _decide(orch, event, state, _decider(forks, event.seq, state.session_id), _clock_for(nxt))
        if not emits and nxt.actor != orch.name:
            continue  # another processor's move
        report.decisions_checked += 1
        divergence = _compare(emits, events, i, state.status)
        if divergence is not None:
            report.divergence = divergence
            return report
    return report


def _decide(orch: Orchestrator, head: ev.Event, state: SessionState, session_id: str, clock: int) -> list[Emit]:
    own = state.session_id
    state.session_id = session_id  # ids the orchestrator derives name the session that decided
    try:
        with _frozen_clock(clock):
            return orch.handle(head, state)
    finally:
        state.session_id = own


def _decider(forks: list[tuple[int, str]], head_seq: int, own: str) -> str:
    """A fork's copied prefix was decided in its parent: the first fork marker after the
    head names the session that made the decision."""
    for seq, parent in forks:
        if seq > head_seq:
            return parent
    return own


def _clock_for(recorded: ev.Event) -> int:
    p = recorded.payload
    if isinstance(p, ev.RetryScheduled):
        return p.not_before_ms - p.delay_ms
    return recorded.time


@contextlib.contextmanager
def _frozen_clock(ms: int) -> Iterator[None]:
    saved = ev.now_ms
    ev.now_ms = lambda: ms  # type: ignore[assignment]
    try:
        yield
    finally:
        ev.now_ms = saved  # type: ignore[assignment]


def _compare(emits: list[Emit], events: Sequence[ev.Event], i: int, status: str) -> Divergence | None:
    head = events[i]
    if not emits:
        nxt = events[i + 1]
        return Divergence(nxt.seq, head.seq, status, None, (nxt.type, _dump(nxt.payload)),
                          reason="the current code decides nothing here")
    for j, emit in enumerate(emits):
        k = i + 1 + j
        expected = (emit.payload.TYPE, _dump(cap(emit.payload)))  # capped as the writer stores it
        if k >= len(events):
            return None  # the log ends inside this decision (a crash before the batch, or --to)
        rec = events[k]
        recorded = (rec.type, _dump(rec.payload))
        if expected[0] != recorded[0]:
            return Divergence(rec.seq, head.seq, status, expected, recorded,
                              reason=f"expected {expected[0]}, recorded {recorded[0]}")
        fields = sorted(f for f in expected[1].keys() | recorded[1].keys()
                        if expected[1].get(f) != recorded[1].get(f))
        if fields:
            return Divergence(rec.seq, head.seq, status, expected, recorded, fields,
                              reason=f"{rec.type} differs in {', '.join(fields)}")
    return None


def _dump(p: ev.Payload) -> dict:
    return p.model_dump()


def _show(item: tuple[str, dict] | None, fields: list[str]) -> str:
    if item is None:
        return "(nothing)"
    t, payload = item
    shown = {k: payload[k] for k in fields if k in payload} if fields else payload
    text = ", ".join(f"{k}={v!r}" for k, v in shown.items())
    return f"{t}({text[:300]}{'…' if len(text) > 300 else ''})"
