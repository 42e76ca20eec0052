"""The embedded runtime: drives sessions in-process over a log (SQLite by default).

It folds a session, finds the events whose handling is still owed (`open_work`),
hands each to the processors that handle its type, and appends what they emit with
optimistic concurrency. Because it works from the folded log, a runtime killed at any
point and started again continues where the log stands: nothing lost, and the
deterministic ids make a redone step's events collide with the first copy instead of
duplicating it.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from loopstream.core import events as ev
from loopstream.core.codec import REGISTRY, seal
from loopstream.core.fsm import machine_next_state
from loopstream.core.log import ConcurrencyError, DuplicateEvent, Log, SessionNotFound
from loopstream.core.policy import SessionPolicy, from_legacy, parse_policy
from loopstream.core.processor import Emit, Processor
from loopstream.core.secrets import Secrets, sanitize
from loopstream.core.state import SessionState, fold, open_work

EventCallback = Callable[[ev.Event], None]


class RuntimeStuck(RuntimeError):
    pass


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

    def __post_init__(self) -> None:
        if isinstance(self.policy, dict):
            self.policy = parse_policy(self.policy, "SessionConfig.policy")
        if self.extra:
            warnings.warn("SessionConfig(extra=…) is deprecated: pass policy=SessionPolicy(…)",
                          DeprecationWarning, stacklevel=3)
            self.policy = self.policy.updated(from_legacy(self.extra), "SessionConfig.extra")
            self.extra = {}


def build_events(
    state: SessionState, cause: ev.Event | None, emits: Sequence[Emit], actor: str,
    secrets: Secrets = (),
) -> list[ev.Event]:
    """Envelopes for what a handler emitted, with ids derived from the cause.

    Every payload passes `core.secrets.sanitize` here: secrets redacted (secret-looking env
    vars, token shapes, LOOPSTREAM_SECRETS, and `secrets`) and every text field capped, so
    no secret value and no unbounded text reaches the log."""
    cause_id = cause.event_id if cause else ""
    return chain(state, [
        ev.Event(
            event_id=ev.derived_id(state.session_id, cause_id, e.payload.TYPE, e.key),
            session_id=state.session_id,
            seq=state.next_seq + i,
            type=e.payload.TYPE,
            time=ev.now_ms(),
            causation_id=cause.event_id if cause else None,
            correlation_id=state.correlation_id,
            actor=actor,
            schema_version=REGISTRY.latest(e.payload.TYPE),
            payload=sanitize(e.payload, secrets),
        )
        for i, e in enumerate(emits)
    ])


def chain(state: SessionState, events: list[ev.Event]) -> list[ev.Event]:
    """Link the events that follow `state` into the session's hash chain (codec.seal)."""
    if state.seq >= 0 and state.chain_head is None:
        return events  # a session written before chaining stays unchained
    return seal(events, state.chain_head)


class Runtime:
    def __init__(
        self, log: Log, processors: Sequence[Processor], on_event: EventCallback | None = None,
        *, secrets: Secrets = (),
    ) -> None:
        self.secrets = secrets if isinstance(secrets, Mapping) else tuple(secrets)  # redacted on top of the env's
        self.log = log
        self.processors = list(processors)
        self.on_event = on_event

    # -- starting ------------------------------------------------------------------
    def start_session(
        self,
        goal: str,
        config: SessionConfig,
        *,
        session_id: str | None = None,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
        actor: str = "cli",
        reply_topic: str | None = None,
    ) -> str:
        if session_id is None and idempotency_key is not None:
            session_id = ev.derived_id("session", idempotency_key)[:16]  # a repeated key starts nothing new
        sid = session_id or ev.new_session_id()
        corr = correlation_id or sid
        started = ev.SessionStarted(
            agent=config.agent,
            provider=config.provider,
            model=config.model,
            system_prompt=config.system_prompt,
            tools=list(config.tools),
            max_steps=config.max_steps,
            workdir=config.workdir,
            config_json=config.policy.to_config_json(),
        )
        goal_ev = ev.GoalReceived(text=goal, idempotency_key=idempotency_key, reply_topic=reply_topic)
        blank = SessionState(session_id=sid, correlation_id=corr)
        root = ev.random_id() if idempotency_key is None else ev.derived_id("goal", idempotency_key)
        batch = build_events(blank, None, [Emit(started), Emit(goal_ev)], actor, self.secrets)
        batch = chain(blank, [e.model_copy(update={"event_id": ev.derived_id(root, str(e.seq))}) for e in batch])
        self._append(blank, batch)
        return sid

    # -- driving -------------------------------------------------------------------
    def load(self, session_id: str) -> SessionState:
        events = self.log.read(session_id)
        if not events:
            raise SessionNotFound(session_id)
        return fold(events)

    def run_session(self, session_id: str, max_events: int = 100_000) -> SessionState:
        """Drive one session until it is done, failed or cancelled (or waits for input)."""
        state = self.load(session_id)
        for _ in range(max_events):
            if state.terminal:
                return state
            work = open_work(state)
            if not work:
                return state  # idle, or waiting for a person: nothing to do until an event arrives
            for seq in work:  # the first owed event a processor acts on
                moved = self._dispatch(state, seq)
                if moved is not None:
                    state = moved
                    break
            else:
                if state.wake_at_ms is None:
                    raise RuntimeStuck(f"session {session_id}: no processor acted on the owed events "
                                       f"{work} in state {state.status!r}")
                # waiting on the clock (a retry's backoff): sleep, then look again
                time.sleep(max(0.0, (state.wake_at_ms - ev.now_ms()) / 1000) + 0.001)
        raise RuntimeStuck(f"session {session_id} did not finish within {max_events} dispatches")

    def record(self, session_id: str, payloads: Sequence[ev.Payload], actor: str, key: str = "",
               attempts: int = 10) -> SessionState:
        """Append what a person or another system decided (approve, deny, cancel) at the
        session's head, from any process: if the log moves on meanwhile, check again on the
        new head. An event that is illegal there raises IllegalTransition."""
        for _ in range(attempts):
            state = self.load(session_id)
            (head,) = self.log.read(session_id, state.seq, state.seq)
            batch = build_events(state, head, [Emit(p, key=key) for p in payloads], actor, self.secrets)
            preview = fold(batch, state, transition=machine_next_state)
            try:
                self.log.append(session_id, batch, state.next_seq)
            except DuplicateEvent:
                return self.load(session_id)  # the same decision was already recorded
            except ConcurrencyError:
                continue
            if self.on_event:
                for e in batch:
                    self.on_event(e)
            return preview
        raise ConcurrencyError(session_id, -1, -1)

    def _dispatch(self, state: SessionState, seq: int) -> SessionState | None:
        """Hand one owed event to its processors; the new state, or None if none acted."""
        (event,) = self.log.read(state.session_id, seq, seq)
        for proc in self.processors:
            if event.type not in proc.triggers:
                continue
            emits = proc.handle(event, state)
            if emits:
                return self._commit(state, event, emits, proc.name)
        return None

    def _commit(self, state: SessionState, cause: ev.Event, emits: Sequence[Emit], actor: str) -> SessionState:
        return self._append(state, build_events(state, cause, emits, actor, self.secrets))

    def _append(self, state: SessionState, batch: list[ev.Event]) -> SessionState:
        # Check the batch against the `transitions` machine before it reaches the log:
        # an illegal event is a bug in a processor and must never be stored.
        preview = fold(batch, state, transition=machine_next_state)
        try:
            self.log.append(state.session_id, batch, state.next_seq)
        except ConcurrencyError:
            # Someone else (or an earlier run of this very step) wrote first: continue
            # from what the log holds now.
            return fold(self.log.read(state.session_id, state.next_seq), state)
        if self.on_event:
            for e in batch:
                self.on_event(e)
        return preview
