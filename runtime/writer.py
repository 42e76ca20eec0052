"""The session writer: the one place events are built and appended to a session.

Every write goes through `SessionWriter`: starting a session, a person's decision at the
head, a handler's emits, the fork's copy. It builds the envelopes (ids derived from the
cause, `core.secrets.sanitize` (redaction and caps), `codec.seal` hash chaining), checks them against the FSM
before anything is stored, and appends with one conflict policy (`_write`).
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from loopstream.core import events as ev
from loopstream.core.codec import REGISTRY, seal
from loopstream.core.construct import factory
from loopstream.core.fsm import LEGAL, machine_next_state
from loopstream.core.log import ConcurrencyError, DuplicateEvent, Log, LogError, SessionNotFound
from loopstream.core.memory import MemoryStore, recall_at_start, resolved_policy
from loopstream.core.policy import CODE_TOOLS, DELEGATION_TOOLS, SessionPolicy, from_legacy, parse_policy
from loopstream.core.processor import Emit
from loopstream.core.sampling import Sampling, record_fields
from loopstream.core.secrets import Secrets, sanitize_all
from loopstream.core.state import Owed, SessionState, Transition, apply, clone, fold, open_work
from loopstream.runtime.snapshots import Snapshots
from loopstream.tools.memory import NAMES as MEMORY_TOOLS

EventCallback = Callable[[ev.Event], None]
Clock = Callable[[], int]


@dataclass
class SessionConfig:
    """What a session is started with (recorded in its SessionStarted event)."""

    provider: str
    model: str
    tools: list[str]
    system_prompt: str = ""
    agent: str = "default"
    max_steps: int = 12
    workdir: str = "."
    policy: SessionPolicy = field(default_factory=SessionPolicy)
    """Budgets, retries, guardrails, permissions, …: core/policy.py (a dict is validated into one)."""
    extra: dict = field(default_factory=dict)
    """Deprecated: the old flat config keys (`{"max_tokens": …}`), merged into `policy`."""
    sampling: Sampling = field(default_factory=Sampling)
    """How the model samples (core/sampling.py): recorded in SessionStarted, sent on every call."""
    definition: str = ""
    """The agent definition as JSON (agents/definition.py), recorded in SessionStarted (v3)."""
    parent_session_id: str | None = None
    """A child session's parent (docs/subagents.md), its ChildrenStarted event and the tree depth
    (SessionStarted v4); None / 0 for a top-level session."""
    parent_event_id: str | None = None
    depth: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.policy, dict):
            self.policy = parse_policy(self.policy, "SessionConfig.policy")
        if self.extra:
            warnings.warn("SessionConfig(extra=…) is deprecated: pass policy=SessionPolicy(…)",
                          DeprecationWarning, stacklevel=3)
            self.policy = self.policy.updated(from_legacy(self.extra), "SessionConfig.extra")
            self.extra = {}


@dataclass
class Written:
    """What a write did. `outcome`: "appended" (`events` are in the log), "duplicate" (the
    same facts were already written: nothing appended), "dropped" (the log moved on and
    what was to be written is no longer owed) or "interrupted" (the session was ended by
    someone else while the handler ran: it was stopped, nothing written; runtime/dispatch.py)."""

    state: SessionState  # the session after the write, as far as this writer knows the log
    events: list[ev.Event]
    outcome: str
    conflicts: int = 0  # ConcurrencyErrors met on the way

    @property
    def appended(self) -> bool:
        return self.outcome == "appended"


def build_events(state: SessionState, cause_id: str | None, emits: Sequence[Emit], actor: str,
                 secrets: Secrets = (), time_ms: int = 0) -> list[ev.Event]:
    """Envelopes for `emits` at the head of `state`, ids derived from the cause, every
    payload sanitized (`core.secrets.sanitize`: secrets redacted, text capped), linked into the hash chain."""
    for e in emits:
        if not isinstance(e.payload, ev.Payload):
            raise TypeError(f"an emit's payload must be an event payload, not {type(e.payload).__name__}")
    if not isinstance(actor, str) or not (cause_id is None or isinstance(cause_id, str)):
        raise TypeError("an envelope's actor and cause id are strings")
    payloads = sanitize_all([e.payload for e in emits], secrets)  # one redactor for the batch
    time_ms = int(time_ms)
    # Every field is a str or int this function made (checked above): built without a
    # second validation (core/construct.py), which cost more than the rest of the envelope.
    return chain(state, [
        _new_event({
            "event_id": ev.derived_id(state.session_id, cause_id or "", e.payload.TYPE, e.key),
            "session_id": state.session_id, "seq": state.next_seq + i, "type": e.payload.TYPE, "time": time_ms,
            "causation_id": cause_id, "correlation_id": state.correlation_id, "actor": actor,
            "schema_version": REGISTRY.latest(e.payload.TYPE), "payload": payload, "chain_hash": None,
        })
        for i, (e, payload) in enumerate(zip(emits, payloads, strict=True))
    ])


_new_event = factory(ev.Event)


def chain(state: SessionState, events: list[ev.Event]) -> list[ev.Event]:
    """Link the events that follow `state` into the session's hash chain (codec.seal)."""
    if state.seq >= 0 and state.chain_head is None:
        return events  # a session written before chaining stays unchained
    return seal(events, state.chain_head)


def copies(events: Sequence[ev.Event], session_id: str) -> list[ev.Event]:
    """Another session's events as facts of `session_id`: ids derived from the originals (a
    retried copy collides instead of duplicating), causation remapped, correlation the new
    session, the same payloads and times; unchained (the writer seals them)."""
    ids: dict[str, str] = {}
    out = []
    for e in events:
        new_id = ev.derived_id(session_id, "fork", e.event_id)
        ids[e.event_id] = new_id
        out.append(e.model_copy(update={
            "event_id": new_id, "session_id": session_id,
            "causation_id": ids.get(e.causation_id, e.causation_id) if e.causation_id else None,
            "correlation_id": session_id, "chain_hash": None,
        }))
    return out


class SessionWriter:
    """Builds and appends a session's events, from any process (see the module docstring).

    `transition` is the FSM check every new event passes before it is stored (the
    `transitions` machine by default). `on_event` is called for each appended event."""

    def __init__(self, log: Log, *, secrets: Secrets = (), on_event: EventCallback | None = None,
                 clock: Clock = ev.now_ms, transition: Transition = machine_next_state, attempts: int = 8) -> None:
        self.log = log
        self.secrets = secrets if isinstance(secrets, Mapping) else tuple(secrets)  # redacted on top of the env's
        self.on_event = on_event
        self.clock = clock
        self.transition = transition
        self.attempts = attempts
        self._memory: MemoryStore | None = None  # the log's memory store, opened by the first start that recalls
        self.snapshots = Snapshots.for_log(log)  # the folded state's projection (runtime/snapshots.py)

    # -- reading --------------------------------------------------------------------
    def load(self, session_id: str) -> SessionState:
        """The session folded at its head (from its latest snapshot, on a SQLite log);
        SessionNotFound if it has no events."""
        if self.snapshots is not None:
            return self.snapshots.latest(session_id)
        events = self.log.read(session_id)
        if not events:
            raise SessionNotFound(session_id)
        return fold(events)

    def refresh(self, state: SessionState) -> SessionState:
        """`state` brought up to the head of the log (folded incrementally)."""
        new = self.log.read(state.session_id, state.next_seq)
        return fold(new, state) if new else state

    # -- the four writes ---------------------------------------------------------------
    def start(self, goal: str, config: SessionConfig, *, session_id: str | None = None,
              correlation_id: str | None = None, idempotency_key: str | None = None, actor: str = "cli",
              reply_topic: str | None = None) -> str:
        """Start a session (SessionStarted + GoalReceived); its id. An idempotency key derives
        the session id and the event ids, so a repeated key starts nothing new. With `[memory]`
        on, the namespace is filled in, the memory tools are added, and what the agent recalls
        is recorded between the two (MemoryRecalled: core/memory.py)."""
        if session_id is None and idempotency_key is not None:
            session_id = ev.derived_id("session", idempotency_key)[:16]
        sid = session_id or ev.new_session_id()
        policy, tools, before = config.policy, list(config.tools), []
        if policy.memory.enabled:
            policy = resolved_policy(policy, config.agent, config.workdir)
            tools += [n for n in MEMORY_TOOLS if policy.memory.tools and n not in tools]
            before = self._recall(goal, policy)
        started = ev.SessionStarted(
            agent=config.agent, provider=config.provider, model=config.model, system_prompt=config.system_prompt,
            tools=tools, max_steps=config.max_steps, workdir=config.workdir,
            config_json=policy.to_config_json(code_tools=bool(CODE_TOOLS & set(tools)),
                                              delegates=bool(DELEGATION_TOOLS & set(tools))),
            **record_fields(config.sampling),
            agent_json=config.definition or json.dumps({"name": config.agent, "source": "flags"}, sort_keys=True),
            parent_session_id=config.parent_session_id, parent_event_id=config.parent_event_id, depth=config.depth,
        )
        goal_ev = ev.GoalReceived(text=goal, idempotency_key=idempotency_key, reply_topic=reply_topic)
        root = ev.random_id() if idempotency_key is None else ev.derived_id("goal", idempotency_key)

        def build(state: SessionState) -> list[ev.Event]:
            emits = [Emit(started), *(Emit(p) for p in before), Emit(goal_ev)]
            batch = build_events(state, None, emits, actor, self.secrets, self.clock())
            return chain(state, [e.model_copy(update={"event_id": ev.derived_id(root, str(e.seq))}) for e in batch])

        blank = SessionState(session_id=sid, correlation_id=correlation_id or sid)
        self._write(blank, build, owed=lambda _: False)  # a session already there is not started again
        return sid

    def _recall(self, goal: str, policy: SessionPolicy) -> list[ev.Payload]:
        """What the agent is given from memory at its start (none with a log that has no store)."""
        if self._memory is None:
            self._memory = MemoryStore.for_log(self.log)  # kept: opening one costs more than a recall
        return [] if self._memory is None else [recall_at_start(self._memory, goal, policy.memory)]

    def record(self, session_id: str, payloads: Sequence[ev.Payload], actor: str, key: str = "") -> Written:
        """Append what a person or another system decided (approve, deny, cancel, a message)
        at the session's head, from any process. The same decision recorded twice at one
        head is written once (its ids derive from the head, the payload and `key`). If the
        log moves on meanwhile, it is appended after the new head if it still applies there
        (legal in the new state; an approval's call still waiting), else dropped. Illegal at
        the head it was first built for: IllegalTransition."""
        state = self.load(session_id)
        emits = [Emit(p, key=f"{key}.{ev.derived_id(p.model_dump_json())[:12]}") for p in payloads]

        def applies(now: SessionState) -> bool:
            return all((now.status, p.TYPE) in LEGAL and (
                not isinstance(p, ev.ApprovalDecided) or p.call_id in now.open_approvals) for p in payloads)

        return self._write(state, lambda s: self._build(s, s.last_event_id, emits, actor), applies)

    def emit(self, state: SessionState, item: Owed, cause: ev.Event, emits: Sequence[Emit], actor: str) -> Written:
        """Append what a handler emitted for the owed `item` (its event `cause`), caused by it."""
        def owed(now: SessionState) -> bool:
            return any(o.seq == item.seq and o.actor == item.actor for o in open_work(now))

        return self._write(state, lambda s: self._build(s, cause.event_id, emits, actor), owed)

    def copy(self, session_id: str, events: Sequence[ev.Event], then: Sequence[ev.Payload] = (),
             actor: str = "fork") -> Written:
        """Append copies of another session's `events` (`copies`) at the head of `session_id`,
        then `then`: new events, each caused by the one before, in one atomic batch. The
        copies were checked when first written and are folded as they are; `then` passes
        the FSM check."""
        state = SessionState(session_id=session_id, correlation_id=session_id)
        if self.log.next_seq(session_id):
            state = self.load(session_id)
        copied = copies(events, session_id)

        def build(s: SessionState) -> list[ev.Event]:
            batch = [e.model_copy(update={"seq": s.next_seq + i}) for i, e in enumerate(copied)]
            head = fold(batch, s)
            for p in then:
                (new,) = build_events(head, head.last_event_id, [Emit(p)], actor, self.secrets, self.clock())
                apply(head, new)
                batch.append(new)
            return chain(s, batch)

        return self._write(state, build, owed=lambda _: False, checked_from=len(copied))

    def link(self, session_id: str, parent_session_id: str, at: SessionState, then: Sequence[ev.Payload],
             actor: str = "fork") -> Written:
        """Start `session_id` as a fork by reference of `parent_session_id` (a `LinkingLog`):
        its history is the parent's events up to `at` (the parent folded to there, not
        copied), then `then`: new events, each caused by the one before, chained to the
        parent's hash at `at`, checked against the FSM, appended in one transaction.
        "dropped" if the session exists; "duplicate" if these very events are stored."""
        base = clone(at)
        base.session_id, base.correlation_id = session_id, session_id
        head, batch = clone(base), []
        for p in then:
            (new,) = build_events(head, head.last_event_id, [Emit(p)], actor, self.secrets, self.clock())
            apply(head, new, self.transition)
            batch.append(new)
        batch = chain(base, batch)
        preview = self._check(base, batch, 0)
        try:
            self.log.append_linked(session_id, parent_session_id, at.seq, batch)  # type: ignore[attr-defined]
        except DuplicateEvent:
            return Written(self.load(session_id), [], "duplicate")
        except ConcurrencyError:
            return Written(base, [], "dropped", 1)
        if self.on_event is not None:
            for e in batch:
                self.on_event(e)
        if self.snapshots is not None:
            self.snapshots.note(preview, base.seq)
        return Written(preview, batch, "appended")

    # -- the one conflict policy ---------------------------------------------------------
    def _write(self, state: SessionState, build: Callable[[SessionState], list[ev.Event]],
               owed: Callable[[SessionState], bool], checked_from: int = 0) -> Written:
        """Check and append `build(state)` at the head. DuplicateEvent: already written.
        ConcurrencyError: refresh from the log and, if what is written is still owed there,
        build it again after the new head (same ids: same cause and keys), else drop it."""
        conflicts = 0
        for _ in range(self.attempts):
            batch = build(state)
            preview = self._check(state, batch, checked_from)  # an illegal event is never stored
            try:
                self.log.append(state.session_id, batch, state.next_seq)
            except DuplicateEvent:
                return Written(self.refresh(state), [], "duplicate", conflicts)
            except ConcurrencyError:
                conflicts += 1
                state = self.refresh(state)
                if not owed(state):
                    return Written(state, [], "dropped", conflicts)
                continue
            if self.on_event is not None:
                for e in batch:
                    self.on_event(e)
            if self.snapshots is not None:
                self.snapshots.note(preview, state.seq)
            return Written(preview, batch, "appended", conflicts)
        raise LogError(f"session {state.session_id}: an append kept conflicting ({conflicts} times)")

    def _build(self, state: SessionState, cause_id: str | None, emits: Sequence[Emit], actor: str) -> list[ev.Event]:
        return build_events(state, cause_id, emits, actor, self.secrets, self.clock())

    def _check(self, state: SessionState, batch: list[ev.Event], checked_from: int) -> SessionState:
        """The state after `batch`; the events from `checked_from` on pass `self.transition`."""
        preview = fold(batch[:checked_from], state) if checked_from else clone(state)
        for e in batch[checked_from:]:
            apply(preview, e, self.transition)
        return preview
