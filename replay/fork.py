"""Fork: a new session that starts from a past event of another one.

The child's log begins with a copy of the parent's events 0..at_seq (new session id,
new event ids, the same facts and times), then a `SessionForked` event with the
provenance (parent, seq, the parent event's chain hash, reason, overrides, acknowledged
side effects) and, optionally, a `UserMessage`. All of it is one atomic append; the
copy is O(at_seq) bytes and everything the child does afterwards appends only new facts.

The child continues live from the state its prefix folds to: run it with
`Runtime.run_session(result.child_session_id)`. If at_seq lands mid-step (a model or
tool call in flight), the driver redoes the owed call (`open_work`). The child is written
by the session writer (`SessionWriter.copy`), like every other write. Overrides (model,
provider, system prompt, tools, step budget) are applied by the fold from SessionForked,
so they take effect from the child's next step.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loopstream.core import events as ev
from loopstream.core.codec import decode, decode_session
from loopstream.core.fsm import IllegalTransition
from loopstream.core.log import Log, SessionNotFound, can_link
from loopstream.core.sampling import SamplingError, sampling_from
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import SessionState, apply, fold
from loopstream.replay.chain import chain_hashes, verify_from, verify_raw
from loopstream.runtime.snapshots import Snapshots
from loopstream.runtime.writer import SessionWriter
from loopstream.tools.builtin import every_tool
from loopstream.tools.registry import ToolRegistry


class ForkError(ValueError):
    """The fork cannot be made as asked (bad seq, illegal message, broken parent chain)."""


@dataclass(frozen=True)
class SideEffect:
    """A tool call of the parent after the fork point whose tool is not read-only."""

    seq: int  # where its result (or, if none, its request) is in the parent
    call_id: str
    name: str
    arguments_json: str
    outcome: str  # "completed" | "failed" | "no result"
    why: str  # "not read-only" | "unknown tool (treated as side-effecting)"
    checkpoint: str | None = None  # commit of its WorkspaceCheckpointed: the workspace before it ran

    def describe(self) -> str:
        text = f"seq {self.seq}: {self.name}({self.arguments_json}) {self.outcome} [{self.why}]"
        if self.checkpoint:
            text += f"; workspace checkpoint {self.checkpoint[:12]} holds the files from before it"
        return text

    def as_json(self) -> dict:
        out = {"seq": self.seq, "call_id": self.call_id, "name": self.name,
               "arguments_json": self.arguments_json, "outcome": self.outcome}
        if self.checkpoint:
            out["checkpoint"] = self.checkpoint
        return out


class ForkNeedsAcknowledgement(ForkError):
    """The parent ran side-effecting tool calls after at_seq; the child may run them again."""

    def __init__(self, session_id: str, at_seq: int, side_effects: Sequence[SideEffect]) -> None:
        self.side_effects = list(side_effects)
        listing = "\n".join(f"  - {s.describe()}" for s in self.side_effects)
        super().__init__(
            f"session {session_id} ran {len(self.side_effects)} side-effecting tool call(s) after seq "
            f"{at_seq}; a fork may run them again. Acknowledge to fork anyway "
            f"(acknowledge_side_effects=True):\n{listing}"
        )


@dataclass
class ForkResult:
    child_session_id: str
    parent_session_id: str
    at_seq: int
    parent_event_hash: str
    events_copied: int
    overrides: dict
    side_effects: list[SideEffect]  # acknowledged (recorded in SessionForked)
    state: SessionState  # the child, folded: what Runtime.run_session continues from
    bytes_copied: int = 0
    message: str | None = None
    events_referred: int = 0  # a fork by reference: the parent's events it reads as its own (none copied)
    notes: list[str] = field(default_factory=list)


def side_effects_after(
    events: Sequence[ev.Event], at_seq: int, registry: ToolRegistry | None = None
) -> list[SideEffect]:
    """Tool calls of `events` that ran after `at_seq` (their result is after it, or they
    have none) and whose tool is not read-only (in `registry`; by default the built-in
    tools, side-effect ones included, and the delegation tools: a fork before a delegation
    starts fresh children, docs/subagents.md). Unknown tools count as side-effecting."""
    registry = registry or every_tool()
    requested: dict[str, ev.Event] = {}
    settled: dict[str, ev.Event] = {}
    checkpoints: dict[str, str] = {}
    for e in events:
        p = e.payload
        if isinstance(p, ev.ToolRequested):
            requested.setdefault(p.call_id, e)
        elif isinstance(p, ev.ToolCompleted | ev.ToolFailed):
            settled.setdefault(p.call_id, e)
        elif p.TYPE == "WorkspaceCheckpointed":
            checkpoints.setdefault(p.call_id, p.commit)  # type: ignore[attr-defined]
    out = []
    for call_id, req in requested.items():
        done = settled.get(call_id)
        if done is not None and done.seq <= at_seq:
            continue  # ran before the fork point: part of the copied history
        p = req.payload
        tool = registry.tools.get(p.name)
        if tool is not None and tool.read_only:
            continue
        outcome = "no result" if done is None else ("completed" if done.type == "ToolCompleted" else "failed")
        out.append(SideEffect(
            seq=done.seq if done is not None else req.seq, call_id=call_id, name=p.name,
            arguments_json=p.arguments_json, outcome=outcome,
            why="not read-only" if tool is not None else "unknown tool (treated as side-effecting)",
            checkpoint=checkpoints.get(call_id),
        ))
    return sorted(out, key=lambda s: s.seq)


def fork(
    log: Log,
    session_id: str,
    at_seq: int,
    *,
    model: str | None = None,
    system_prompt: str | None = None,
    tools: Sequence[str] | None = None,
    message: str | None = None,
    reason: str = "",
    acknowledge_side_effects: bool = False,
    provider: str | None = None,
    max_steps: int | None = None,
    sampling: Mapping[str, Any] | None = None,
    registry: ToolRegistry | None = None,
    child_session_id: str | None = None,
    actor: str = "fork",
    writer: SessionWriter | None = None,
) -> ForkResult:
    """Fork `session_id` after its event `at_seq` into a new session (see the module doc).

    Raises ForkNeedsAcknowledgement (listing them) if the parent ran side-effecting tool
    calls after at_seq, unless acknowledge_side_effects; ForkError if at_seq is out of
    range or terminal, the parent's chain is broken up to at_seq, a message is not legal
    where the fork lands, `tools` names a tool `registry` does not have, or the child id is taken.
    `sampling` changes some of the recorded sampling settings (core/sampling.py), e.g. {"temperature": 0.7}."""
    if tools is not None and registry is not None:
        unknown = [t for t in tools if t not in registry.tools]
        if unknown:
            raise ForkError(f"unknown tool(s) {', '.join(unknown)}; known: {', '.join(sorted(registry.tools))}")
    parent = _read_parent(log, session_id, at_seq, registry)
    at_state, effects = parent.state, parent.effects
    if effects and not acknowledge_side_effects:
        raise ForkNeedsAcknowledgement(session_id, at_seq, effects)

    overrides: dict = {}
    if model is not None:
        overrides["model"] = model
    if provider is not None:
        overrides["provider"] = provider
    if system_prompt is not None:
        overrides["system_prompt"] = system_prompt
    if tools is not None:
        overrides["tools"] = list(tools)
    if max_steps is not None:
        overrides["max_steps"] = int(max_steps)
    if sampling:
        try:
            changed = sampling_from(dict(sampling), at_state.sampling, "fork sampling")
        except SamplingError as exc:
            raise ForkError(str(exc)) from None
        overrides["sampling"] = {k: v for k, v in changed.model_dump(mode="json").items() if k in sampling}

    child = child_session_id or ev.new_session_id()
    parent_hash = parent.hash_hex
    marker = ev.SessionForked(
        parent_session_id=session_id, parent_seq=at_seq, parent_event_hash=parent_hash, reason=reason,
        overrides_json=json.dumps(overrides, sort_keys=True),
        acknowledged_side_effects_json=json.dumps([s.as_json() for s in effects], sort_keys=True),
    )
    then = [marker] if message is None else [marker, ev.UserMessage(text=message)]
    writer = writer or SessionWriter(log)
    try:  # the prefix was legal in the parent; the new events pass the FSM check
        if parent.prefix is None:  # by reference: nothing of the parent is copied
            written = writer.link(child, session_id, at_state, then, actor)
        else:
            written = writer.copy(child, parent.prefix, then, actor)
    except IllegalTransition as exc:
        bad = next(e for e in then if e.TYPE == exc.event_type)
        raise ForkError(_illegal_hint(bad.TYPE, at_state, parent.events_to(at_seq))) from None
    if written.outcome == "dropped":
        raise ForkError(f"session {child} already exists")
    copied = parent.prefix is not None
    return ForkResult(
        child_session_id=child, parent_session_id=session_id, at_seq=at_seq, parent_event_hash=parent_hash,
        events_copied=at_seq + 1 if copied else 0, overrides=overrides, side_effects=effects, state=written.state,
        bytes_copied=parent.prefix_bytes if copied else 0, message=message,
        events_referred=0 if copied else at_seq + 1,
    )


@dataclass
class _Parent:
    """What a fork needs to know of its parent at `at_seq`."""

    log: Log
    session_id: str
    state: SessionState  # folded to at_seq
    hash_hex: str  # the chain hash of its event at_seq
    effects: list[SideEffect]
    prefix: list[ev.Event] | None  # the events to copy; None: the child refers to them
    prefix_bytes: int

    def events_to(self, at_seq: int) -> list[ev.Event]:
        return self.prefix if self.prefix is not None else self.log.read(self.session_id, 0, at_seq)


_TOOL_TYPES = ("ToolRequested", "ToolCompleted", "ToolFailed", "WorkspaceCheckpointed")


def _read_parent(log: Log, session_id: str, at_seq: int, registry: ToolRegistry | None) -> _Parent:
    """The parent at `at_seq`, checked (range, chain, not terminal, not inside a batch). On a
    log that stores forks by reference, with a chained parent: from the nearest snapshot at or
    before `at_seq` (runtime/snapshots.py), the chain verified from it to `at_seq` (a snapshot
    is written only over an intact chain; `verify` / `replay --check` check all of it), the
    prefix neither decoded nor copied. Otherwise the whole log is read and the prefix copied."""
    last = log.next_seq(session_id) - 1
    if last < 0:
        raise SessionNotFound(session_id)
    if not 0 <= at_seq <= last:
        raise ForkError(f"session {session_id} has seqs 0..{last}; cannot fork at {at_seq}")
    snaps = Snapshots.for_log(log) if can_link(log) else None
    if snaps is not None:  # the state from the nearest snapshot; the chain verified from it on
        at_state = snaps.state_at(session_id, at_seq)
        base = snaps.base
        start = base.seq + 1 if base is not None else 0
        if base is None or base.chain_head is not None:
            raw = log.read_raw(session_id, start, at_seq)
            chain = verify_from(raw, base.chain_head if base else None, session_id, start) if base else \
                verify_raw(raw, session_id)
            if not chain.ok:
                raise ForkError(f"will not fork from a broken chain: session {session_id} {chain.describe()}")
            if chain.status == "ok":
                window, lo = _window(log, session_id, at_seq, last)
                _check_point(at_state, window, at_seq - lo, lo)
                return _Parent(log, session_id, at_state, chain.head,
                               _effects_after(log, session_id, at_seq, at_state, registry), None, 0)
    # copied (Kafka; a session from before chaining): the whole log is read
    prefix_raw = log.read_raw(session_id, 0, at_seq)
    chain = verify_raw(prefix_raw, session_id)
    if not chain.ok:
        raise ForkError(f"will not fork from a broken chain: session {session_id} {chain.describe()}")
    events = [decode(b) for b in log.read_raw(session_id)]
    at_state = fold(events[: at_seq + 1])
    _check_point(at_state, events, at_seq, 0)
    return _Parent(log, session_id, at_state, chain_hashes(prefix_raw)[-1].hex(),
                   side_effects_after(events, at_seq, registry), events[: at_seq + 1],
                   sum(len(b) for b in prefix_raw))


def _window(log: Log, session_id: str, at_seq: int, last: int) -> tuple[list[ev.Event], int]:
    """Events around `at_seq` that hold its whole atomic batch; (events, seq of the first)."""
    width = 8
    while True:
        lo, hi = max(0, at_seq - width), min(last, at_seq + width)
        events = log.read(session_id, lo, hi)
        first, end = batch_bounds(events, at_seq - lo)
        if (first > 0 or lo == 0) and (end < len(events) - 1 or hi == last):
            return events, lo
        width *= 4


def _check_point(at_state: SessionState, events: Sequence[ev.Event], i: int, lo: int) -> None:
    """Refuse a fork at a terminal event or inside an atomic batch (`events[i]` is at the fork point)."""
    at_seq = lo + i
    if at_state.terminal:
        raise ForkError(
            f"seq {at_seq} ends the session ({events[i].type}); fork at {at_seq - 1} to continue "
            "from just before it (with --message to say something new)"
        )
    first, end = batch_bounds(events, i)
    first, end = first + lo, end + lo
    if end > at_seq:
        raise ForkError(
            f"seq {at_seq} is inside an atomic batch (seqs {first}..{end}, written together by "
            f"{events[i].actor}); a live session is never between them: fork at {end}"
            + (f" or {first - 1}" if first > 0 else "")
        )


def _effects_after(log: Log, session_id: str, at_seq: int, at_state: SessionState,
                   registry: ToolRegistry | None) -> list[SideEffect]:
    """`side_effects_after` without decoding the session when no tool it ever requested can
    have one: the names come from the calls open at `at_seq`, the latest snapshot
    (`requested_tools`) and the requests after it; if one is not read-only, every tool event
    is decoded."""
    registry = registry or every_tool()
    fields = Snapshots(log).fields_at(session_id) if isinstance(log, SQLiteLog) else None  # type: ignore[arg-type]
    since = max(at_seq, fields["seq"]) if fields else at_seq
    requests = log.read_raw_of_types(session_id, ("ToolRequested",), since + 1)  # type: ignore[attr-defined]
    names = {p.call.name for p in at_state.pending_calls.values()} | set(fields["requested_tools"] if fields else ())
    names |= {e.payload.name for e in decode_session([d for _, d in requests], session_id)}  # type: ignore[attr-defined]
    if all((t := registry.tools.get(n)) is not None and t.read_only for n in names):
        return []
    tool_events = decode_session([d for _, d in log.read_raw_of_types(session_id, _TOOL_TYPES)],  # type: ignore[attr-defined]
                                 session_id)
    return side_effects_after(tool_events, at_seq, registry)


def batch_bounds(events: Sequence[ev.Event], seq: int) -> tuple[int, int]:
    """The seqs of the batch `seq` was appended in: consecutive events that one handler
    emitted for one cause (same causation and actor). The runtime appends a batch
    atomically, so a fork may land before or after one, never inside."""
    def same(i: int, j: int) -> bool:
        a, b = events[i], events[j]
        return a.causation_id is not None and a.causation_id == b.causation_id and a.actor == b.actor

    first = seq
    while first > 0 and same(first - 1, first):
        first -= 1
    end = seq
    while end + 1 < len(events) and same(end, end + 1):
        end += 1
    return first, end


def _illegal_hint(event_type: str, at_state: SessionState, prefix: Sequence[ev.Event]) -> str:
    if event_type != "UserMessage":
        return f"{event_type} is not legal in state {at_state.status!r}"
    ok = _message_ok_seqs(prefix)
    near = f"; the nearest earlier seq where it is: {ok[-1]}" if ok else ""
    return (f"a message cannot be added at seq {at_state.seq}: the session is {at_state.status!r} "
            f"(a model or tool call is owed an answer there){near}")


def _message_ok_seqs(prefix: Sequence[ev.Event]) -> list[int]:
    """Seqs of `prefix` after which a UserMessage is legal (idle, planning, final reply)."""
    state = SessionState()
    ok = []
    for e in prefix:
        apply(state, e)
        if state.status in ("idle", "planning") or (state.status == "acting" and not state.last_reply_calls):
            ok.append(e.seq)
    return ok
