"""Results: SessionUpdates for sessions started from goals. `ResultsPublisher`, a processor
of the orchestrator role, sends them at-least-once (consumers keep the first per
(session_id, seq)); kafka/relay.py sends the results exactly once with `results=transactional`.
The contract: docs/kafka.md#the-goal-contract."""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from loopstream.core import events as ev
from loopstream.core.describe import summarize
from loopstream.core.log import Log
from loopstream.core.processor import Emit
from loopstream.core.state import SessionState
from loopstream.kafka.clients import ContractProducer
from loopstream.kafka.contract import SessionUpdate, encode_update, session_id_for

RESULT_STATUS = {"SessionFinished": "done", "SessionFailed": "failed", "SessionCancelled": "cancelled"}
PROGRESS_TYPES = frozenset({"ModelResponded", "ModelFailed", "RetryScheduled", "ModelFallback",
                            "ToolCompleted", "ToolFailed", "ContextCompacted"})


def result_update(event: ev.Event, correlation_id: str, idempotency_key: str | None) -> SessionUpdate:
    p = event.payload
    return SessionUpdate(
        correlation_id=correlation_id, session_id=event.session_id, kind="result",
        status=RESULT_STATUS[event.type], seq=event.seq, event_type=event.type, time=event.time,
        answer=p.answer if isinstance(p, ev.SessionFinished) else None,
        error=getattr(p, "reason", None) if not isinstance(p, ev.SessionFinished) else None,
        idempotency_key=idempotency_key, detail=summarize(event, 200),
    )


class GoalLookup:
    """The GoalReceived of a session started from a goal, or None (cached per session id).

    Only such sessions publish: the session id must be the one derived from the goal's
    idempotency key, so a fork (which copies its GoalReceived) does not answer the original
    requester. Shared by the ResultsPublisher and the transactional relay (kafka/relay.py)."""

    def __init__(self, log: Log, cache_size: int = 4096) -> None:
        self.log, self.cache_size = log, cache_size
        self._goals: OrderedDict[str, ev.GoalReceived | None] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, session_id: str) -> ev.GoalReceived | None:
        with self._lock:
            if session_id in self._goals:
                return self._goals[session_id]
        goal = next((e.payload for e in self.log.read(session_id, 0, 2)
                     if isinstance(e.payload, ev.GoalReceived)), None)
        if goal is not None and not (goal.reply_topic and goal.idempotency_key
                                     and session_id_for(goal.idempotency_key) == session_id):
            goal = None  # not started from a goal (or a fork of such a session)
        with self._lock:
            self._goals[session_id] = goal
            while len(self._goals) > self.cache_size:
                self._goals.popitem(last=False)
        return goal


def goal_result(goals: GoalLookup, event: ev.Event) -> tuple[str, SessionUpdate] | None:
    """(reply topic, result update) for a terminal event of a goal-started session, else None."""
    if event.type not in RESULT_STATUS:
        return None
    goal = goals(event.session_id)
    if goal is None:
        return None
    return goal.reply_topic or "", result_update(event, event.correlation_id, goal.idempotency_key)


class ResultsPublisher:
    """A processor with no emits: sends SessionUpdates for sessions started from goals.

    `results=False` sends progress updates only (the results then go through the
    transactional relay, kafka/relay.py)."""

    name = "results"
    triggers = frozenset(RESULT_STATUS) | PROGRESS_TYPES

    def __init__(self, log: Log, producer: ContractProducer, cache_size: int = 4096, *,
                 results: bool = True, encode: Callable[[str, SessionUpdate], bytes] | None = None) -> None:
        self.log, self.producer, self.cache_size = log, producer, cache_size
        # (topic, update) -> bytes: plain Avro, or framed by a schema registry (kafka/registry.py)
        self.encode = encode or (lambda _topic, update: encode_update(update))
        self.goals = GoalLookup(log, cache_size)
        if not results:
            self.triggers = PROGRESS_TYPES

    def _goal(self, session_id: str) -> ev.GoalReceived | None:
        return self.goals(session_id)

    def handle(self, event: ev.Event, state: SessionState) -> list[Emit]:
        if event.type not in self.triggers:
            return []
        if event.type in RESULT_STATUS:
            found = goal_result(self.goals, event)
            if found is not None:
                self.publish(*found)
            return []
        goal = self._goal(event.session_id)
        if goal is None:
            return []
        if not state.policy.progress_updates:
            return []
        update = SessionUpdate(  # status: the session's state now (at the head of the log)
            correlation_id=event.correlation_id, session_id=event.session_id, kind="progress",
            status=state.status, seq=event.seq, event_type=event.type,
            time=event.time, idempotency_key=goal.idempotency_key, detail=summarize(event, 200),
        )
        self.publish(goal.reply_topic or "", update)
        return []

    def publish(self, topic: str, update: SessionUpdate) -> None:
        self.producer.send(topic, update.session_id, self.encode(topic, update), headers=update_headers(update))


def update_headers(update: SessionUpdate) -> list[tuple[str, bytes]]:
    return [("ls.kind", update.kind.encode()), ("ls.seq", str(update.seq).encode())]


