"""`loopstream submit`: hand a goal to the workers (a Goal record on Kafka, or a new
session in a SQLite log) and, if asked, wait for its result."""
from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from loopstream.core import events as ev
from loopstream.core.log import Log, LogError
from loopstream.core.state import SessionState, fold
from loopstream.kafka import clients
from loopstream.kafka.clients import CONTRACT, ContractProducer, KafkaException, TopicPartition
from loopstream.kafka.contract import (
    ContractError,
    Goal,
    SessionUpdate,
    decode_update,
    encode_goal,
    parse_kafka_url,
    session_id_for,
)
from loopstream.kafka.settings import KafkaSettings
from loopstream.runtime.writer import SessionConfig, SessionWriter


@dataclass
class Submitted:
    session_id: str
    correlation_id: str
    idempotency_key: str
    result: SessionUpdate | None = None


def submit_goal(bus: str, goal: Goal, *, wait: bool = False, timeout: float = 300.0,
                on_progress: Callable[[SessionUpdate], None] | None = None,
                settings: KafkaSettings | None = None) -> Submitted:
    """Produce `goal` to the goals topic; with `wait`, consume its reply topic until the
    session's result arrives (LogError after `timeout` seconds). `settings`: the clients'
    (default: the environment's, kafka/settings.py)."""
    kbus = parse_kafka_url(bus, settings)
    goal = dataclasses.replace(goal, idempotency_key=goal.idempotency_key or uuid.uuid4().hex,
                               submitted_ms=goal.submitted_ms or ev.now_ms())
    goal.correlation_id = goal.correlation_id or goal.idempotency_key
    goal.reply_topic = goal.reply_topic or kbus.results_topic
    sid = session_id_for(goal.idempotency_key)
    out = Submitted(sid, goal.correlation_id, goal.idempotency_key)
    producer = ContractProducer(kbus.bootstrap, settings=kbus.settings)
    consumer = None
    try:
        producer.ensure_topic(kbus.goals_topic, "goals")
        if wait:
            producer.ensure_topic(goal.reply_topic)
            consumer = clients.reader(kbus.bootstrap, "loopstream-submit", CONTRACT, settings=kbus.settings)
            parts = consumer.list_topics(goal.reply_topic, timeout=30).topics[goal.reply_topic].partitions
            try:  # start at the end: only updates produced after this goal can answer it
                ends = [TopicPartition(goal.reply_topic, p, consumer.get_watermark_offsets(
                    TopicPartition(goal.reply_topic, p), timeout=30, cached=False)[1]) for p in parts]
            except KafkaException as exc:
                raise LogError(f"cannot read the end of {goal.reply_topic}: {exc}") from exc
            consumer.assign(ends)
        producer.send(kbus.goals_topic, goal.idempotency_key, encode_goal(goal), kind="goals")
        if consumer is None:
            return out
        seen: set[tuple[str, int]] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(min(0.5, max(0.0, deadline - time.monotonic())))
            if msg is None or msg.error() is not None:
                continue
            try:
                update = decode_update(msg.value() or b"")
            except ContractError:
                continue
            if update.session_id != sid and update.correlation_id != goal.correlation_id:
                continue
            if update.dedupe_key in seen:
                continue
            seen.add(update.dedupe_key)
            if update.kind == "result":
                out.result = update
                return out
            if on_progress is not None:
                on_progress(update)
        raise LogError(f"no result for session {sid} within {timeout:.0f}s (it may still be running: "
                       f"loopstream show --bus {bus} {sid})")
    finally:
        if consumer is not None:
            consumer.close()
        producer.close()


def start_local(log: Log, goal: Goal, config: SessionConfig) -> str:
    """`submit` on a SQLite bus: append the session directly (workers pick it up)."""
    key = goal.idempotency_key or uuid.uuid4().hex
    return SessionWriter(log).start(goal.goal, config, idempotency_key=key,
                                   correlation_id=goal.correlation_id or key, actor="submit")


def wait_local(log: Log, session_id: str, timeout: float) -> SessionState:
    deadline = time.monotonic() + timeout
    state = fold(log.read(session_id))
    while not state.terminal:
        if time.monotonic() > deadline:
            raise LogError(f"session {session_id} did not end within {timeout:.0f}s")
        time.sleep(0.1)
        state = fold(log.read(session_id, state.next_seq), state)
    return state
