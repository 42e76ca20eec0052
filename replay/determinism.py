"""Determinism check: would today's code make the decisions this session's log records?

The real in-process driver (`runtime.inline.Runtime`) runs the session again over a
scratch copy (an in-memory SQLite log) with the real orchestrator and a frozen clock:
before each dispatch the clock is set to when the recorded event was made. Replies
(model, compaction, tools, SessionEnd hooks) are never re-executed: the `Recorded` processors answer each
owed request with what the log recorded for it, and inputs from outside the loop (the
goal, a person's message, approval or cancel, a fork's marker) are copied in where they
were recorded. Each orchestrator decision the driver writes is compared with the log;
the first one that differs (type or any payload field) is reported, with the seq.

A fork's copied prefix was decided in its parent: that part is driven under the parent's
session id (the ids the orchestrator derives name the session that decided).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from loopstream.core import events as ev
from loopstream.core.codec import CodecError, decode
from loopstream.core.fsm import ANNOTATIONS, next_state
from loopstream.core.log import Log, SessionNotFound
from loopstream.core.processor import Emit
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import SessionState
from loopstream.processors.orchestrator import Orchestrator
from loopstream.replay.chain import ChainReport, verify_raw
from loopstream.runtime.inline import Runtime
from loopstream.runtime.writer import SessionWriter

# Events that come from outside the loop (people, goal producers, forks, annotations such as an
# eval's grades and feedback): copied, not re-made.
INPUT_TYPES = frozenset({"SessionStarted", "GoalReceived", "UserMessage", "SessionForked", "SessionCancelled",
                         "ApprovalDecided", "MemoryRecalled"}) | ANNOTATIONS
REPLYING = ("model", "compaction", "tools", "children", "hooks")  # the actors whose work is answered from the log


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


def check_raw(raw: Sequence[bytes], session_id: str = "") -> DeterminismReport:
    """The check over stored event bytes (only the part the chain vouches for)."""
    chain = verify_raw(raw, session_id)
    good = raw if chain.ok else raw[: chain.first_bad_seq]
    try:
        events = [decode(b) for b in good]
    except CodecError as exc:
        bad = ChainReport(session_id, "broken", len(good), None, str(exc))
        return DeterminismReport(session_id, len(good), 0, bad)
    return check_events(events, session_id, chain)


def check_events(events: Sequence[ev.Event], session_id: str = "", chain: ChainReport | None = None) -> DeterminismReport:
    chain = chain or ChainReport(session_id, "unchained", len(events))
    report = DeterminismReport(session_id or (events[0].session_id if events else ""), len(events), 0, chain)
    for lo, hi, decider in _segments(events):
        report.divergence = _drive(events, lo, hi, decider, report)
        if report.divergence is not None:
            break
    return report


def _segments(events: Sequence[ev.Event]) -> list[tuple[int, int, str]]:
    """(from, to, session that decided) spans: up to each fork marker its parent decided. A
    fork by reference begins with its parent's events as they are: events that name another
    session than this one's (its last event's) were decided by that session."""
    out, lo = [], 0
    own = events[-1].session_id if events else ""
    for e in events:
        if isinstance(e.payload, ev.SessionForked):
            first = events[lo].session_id
            out.append((lo, e.seq, first if first != own else e.payload.parent_session_id))
            lo = e.seq
    return out + [(lo, len(events), own)]


class Recorded:
    """Answers owed work of `actor` with the batch the log recorded for it: no call is made."""

    triggers = frozenset(ev.PAYLOAD_TYPES)

    def __init__(self, actor: str, events: Sequence[ev.Event]) -> None:
        self.name = self.acts_for = actor
        self.events = events

    def handle(self, event: ev.Event, state: SessionState, now_ms: int) -> list[Emit]:
        batch = _batch(self.events, state.next_seq)
        if not batch or batch[0].causation_id != self.events[event.seq].event_id:
            return []
        return [Emit(e.payload, key=str(i)) for i, e in enumerate(batch)]


class _Clock:
    now = 0

    def __call__(self) -> int:
        return self.now


def _drive(events: Sequence[ev.Event], lo: int, hi: int, sid: str, report: DeterminismReport) -> Divergence | None:
    """Run the driver over events [lo, hi) in session `sid` (the prefix before lo copied in)."""
    clock = _Clock()
    seqs = {e.event_id: e.seq for e in events}
    with SQLiteLog(":memory:") as scratch:
        # The compiled table: the same answers as the `transitions` machine (tests/test_fsm.py), faster.
        writer = SessionWriter(scratch, clock=clock, transition=next_state)
        runtime = Runtime(scratch, [Orchestrator(), *(Recorded(a, events) for a in REPLYING)], writer=writer)
        state = writer.copy(sid, events[:lo]).state if lo else SessionState(session_id=sid)
        i = lo
        while i < hi:
            rec = events[i]
            clock.now = _clock_for(rec)
            if _is_input(rec):
                state = writer.copy(sid, [rec]).state
                i += 1
                continue
            cause = seqs.get(rec.causation_id or "")
            item = next((o for o in runtime.dispatch.work(state) if o.seq == cause), None)
            if item is None or not item.due(clock.now):
                why = (f"the current code owes nothing at seq {cause} in state {state.status!r}" if item is None
                       else f"the current code waits there until {item.not_before_ms}, the log acted at {clock.now}")
                return Divergence(rec.seq, state.seq, state.status, None, (rec.type, _dump(rec.payload)),
                                  reason=f"{why}; the log has {rec.type}")
            head = state
            try:
                written = runtime.act(state, item, clock.now)
            except RuntimeError as exc:  # an illegal decision (the writer's FSM check)
                return Divergence(rec.seq, head.seq, head.status, None, (rec.type, _dump(rec.payload)),
                                  reason=str(exc))
            made = [e for w in written for e in w.events]
            if item.actor != "orchestrator" and made:
                state, i = written[-1].state, i + len(made)
                continue
            report.decisions_checked += 1
            if (diverged := _compare(made, events, i, head)) is not None:
                return diverged
            state, i = written[-1].state, i + len(made)
    return None


def _batch(events: Sequence[ev.Event], i: int) -> list[ev.Event]:
    """The recorded batch starting at seq `i`: one cause, one actor (written together)."""
    if i >= len(events):
        return []
    end = i + 1
    while end < len(events) and (events[end].causation_id, events[end].actor) == (events[i].causation_id,
                                                                                  events[i].actor):
        end += 1
    return list(events[i:end])


def _is_input(e: ev.Event) -> bool:
    """Not made by a processor: from outside the loop, or a driver giving up on a handler."""
    return (e.type in INPUT_TYPES or e.causation_id is None
            or (isinstance(e.payload, ev.SessionFailed) and e.payload.error_kind == "internal"))


def _clock_for(recorded: ev.Event) -> int:
    """When the decision behind `recorded` was made (a retry's delay counts from then)."""
    p = recorded.payload
    if isinstance(p, ev.RetryScheduled):
        return p.not_before_ms - p.delay_ms
    return recorded.time


def _compare(made: list[ev.Event], events: Sequence[ev.Event], i: int, head: SessionState) -> Divergence | None:
    if not made:
        rec = events[i]
        return Divergence(rec.seq, head.seq, head.status, None, (rec.type, _dump(rec.payload)),
                          reason="the current code decides nothing here")
    for k, new in enumerate(made[: len(events) - i]):  # the log may end inside this decision (--to)
        rec = events[i + k]
        expected, recorded = (new.type, _dump(new.payload)), (rec.type, _dump(rec.payload))
        if expected[0] != recorded[0]:
            return Divergence(rec.seq, head.seq, head.status, expected, recorded,
                              reason=f"expected {expected[0]}, recorded {recorded[0]}")
        fields = sorted(f for f in expected[1].keys() | recorded[1].keys() if expected[1].get(f) != recorded[1].get(f))
        if fields:
            return Divergence(rec.seq, head.seq, head.status, expected, recorded, fields,
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
