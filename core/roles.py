"""Worker roles over Kafka, the goal intake, the results publisher, and `submit`.

Roles (each one consumer group `<group prefix>.<role>` over the events topic):
- `orchestrator`: the Orchestrator, the ResultsPublisher (SessionUpdates to each goal's
  reply topic) and the GoalIntake (consumer group `<group prefix>.intake` on the goals
  topic: one session per goal);
- `model`: the ModelProcessor and the CompactionProcessor (both call the provider);
- `tool`: the ToolProcessor with the default tool registry (read-only tools);
- `all`: every processor, intake and publisher in one process.

With `kafka://…?results=transactional` the orchestrator role also runs the transactional
results relay (core/relay.py, consumer group `<group prefix>.results`), which publishes the
results exactly once for read_committed readers; the publisher then sends progress only.

Results, at-least-once: the publisher is a processor of the orchestrator role: it sends one
`result` SessionUpdate per terminal event (SessionFinished/Failed/Cancelled) and, when the
goal asked for it, one `progress` update per step event, keyed by session id, flushed
before the delivery counts as handled. A crash between the send and the offset commit
sends that update again, byte for byte the same except nothing: consumers keep the first
record per (session_id, seq). Only sessions started from a goal publish (the session id
must be the one derived from the goal's idempotency key, so a fork of such a session,
which copies its GoalReceived, does not answer the original requester).

A goal whose idempotency key already started a session starts nothing new; if that
session has ended, its result is sent again to the new goal's reply topic with the new
goal's correlation id (same session id and seq: deduplicating consumers drop it).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopstream.core import events as ev
from loopstream.core.background import BackgroundLoop
from loopstream.core.contract import (
    ContractError,
    Goal,
    KafkaBus,
    SessionUpdate,
    decode_goal,
    decode_update,
    encode_goal,
    encode_update,
    parse_kafka_url,
    session_id_for,
)
from loopstream.core.describe import summarize
from loopstream.core.log import Log, LogError
from loopstream.core.processor import Emit, Processor
from loopstream.core.runtime import Runtime, SessionConfig
from loopstream.core.state import SessionState, fold

logger = logging.getLogger("loopstream.roles")

ROLES = ("orchestrator", "model", "tool", "all")
RESULT_STATUS = {"SessionFinished": "done", "SessionFailed": "failed", "SessionCancelled": "cancelled"}
PROGRESS_TYPES = frozenset({"ModelResponded", "ModelFailed", "RetryScheduled", "ModelFallback",
                            "ToolCompleted", "ToolFailed", "ContextCompacted"})


# -- producing contract records ----------------------------------------------------------
class ContractProducer:
    """An idempotent producer (acks=all) for goals and updates; `send` waits for the ack."""

    def __init__(self, bootstrap: str, *, timeout: float = 30.0, partitions: int = 3) -> None:
        from confluent_kafka import Producer
        from confluent_kafka.admin import AdminClient

        self.timeout, self.partitions = timeout, partitions
        self._admin = AdminClient({"bootstrap.servers": bootstrap})
        self._producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                                   "acks": "all", "linger.ms": 2,
                                   "message.timeout.ms": int(timeout * 1000)})
        self._topics: set[str] = set()
        self._lock = threading.Lock()

    def ensure_topic(self, topic: str) -> None:
        if topic in self._topics:
            return
        ensure_topic(self._admin, topic, self.partitions, self.timeout)
        self._topics.add(topic)

    def send(self, topic: str, key: str, value: bytes, headers: Sequence[tuple[str, bytes]] = ()) -> None:
        from confluent_kafka import KafkaException

        self.ensure_topic(topic)
        result: list[Any] = []
        try:
            self._producer.produce(topic, key=key.encode(), value=value, headers=list(headers),
                                   on_delivery=lambda err, msg: result.append(err))
        except (KafkaException, BufferError) as exc:
            raise LogError(f"cannot produce to {topic}: {exc}") from exc
        deadline = time.monotonic() + self.timeout
        while not result and time.monotonic() < deadline:
            self._producer.flush(min(1.0, max(0.0, deadline - time.monotonic())))
        if not result or result[0] is not None:
            raise LogError(f"{topic}: the broker did not acknowledge a record: "
                           f"{result[0] if result else 'timeout'}")

    def close(self) -> None:
        self._producer.flush(self.timeout)
        getattr(self._producer, "close", lambda: None)()


def ensure_topic(admin: Any, topic: str, partitions: int = 3, timeout: float = 30.0) -> None:
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    md = admin.list_topics(timeout=timeout)
    if topic not in md.topics or md.topics[topic].error is not None:
        fut = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        try:
            fut[topic].result(timeout=timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise LogError(f"cannot create topic {topic}: {exc}") from exc
    deadline = time.monotonic() + timeout
    while True:
        t = admin.list_topics(topic, timeout=timeout).topics.get(topic)
        if t is not None and t.error is None and t.partitions:
            return
        if time.monotonic() > deadline:
            raise LogError(f"topic {topic} did not appear")
        time.sleep(0.05)


# -- results -----------------------------------------------------------------------------
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
    requester. Shared by the ResultsPublisher and the transactional relay (core/relay.py)."""

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
    transactional relay, core/relay.py)."""

    name = "results"
    triggers = frozenset(RESULT_STATUS) | PROGRESS_TYPES

    def __init__(self, log: Log, producer: ContractProducer, cache_size: int = 4096, *,
                 results: bool = True) -> None:
        self.log, self.producer, self.cache_size = log, producer, cache_size
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
        if not state.config.get("progress_updates"):
            return []
        update = SessionUpdate(  # status: the session's state now (at the head of the log)
            correlation_id=event.correlation_id, session_id=event.session_id, kind="progress",
            status=state.status, seq=event.seq, event_type=event.type,
            time=event.time, idempotency_key=goal.idempotency_key, detail=summarize(event, 200),
        )
        self.publish(goal.reply_topic or "", update)
        return []

    def publish(self, topic: str, update: SessionUpdate) -> None:
        self.producer.send(topic, update.session_id, encode_update(update), headers=update_headers(update))


def update_headers(update: SessionUpdate) -> list[tuple[str, bytes]]:
    return [("ls.kind", update.kind.encode()), ("ls.seq", str(update.seq).encode())]


# -- agents ------------------------------------------------------------------------------
def default_agents(provider: str, model: str, agents_file: Path | None = None) -> dict[str, SessionConfig]:
    """The agent configurations goals may name: `default` (the worker's provider/model, the
    default read-only tools) plus those of a JSON file {name: {SessionConfig fields}}."""
    from loopstream.core.agent import DEFAULT_SYSTEM_PROMPT
    from loopstream.tools.registry import default_registry

    base = SessionConfig(provider=provider, model=model, tools=default_registry().names(),
                         system_prompt=DEFAULT_SYSTEM_PROMPT, agent="default", workdir=".")
    agents = {"default": base}
    if agents_file is not None:
        try:
            spec = json.loads(Path(agents_file).read_text())
        except (OSError, ValueError) as exc:
            raise ContractError(f"cannot read agents file {agents_file}: {exc}") from None
        fields = {f.name for f in dataclasses.fields(SessionConfig)}
        for name, over in spec.items():
            unknown = set(over) - fields
            if unknown:
                raise ContractError(f"agent {name!r}: unknown fields {sorted(unknown)}")
            agents[name] = dataclasses.replace(base, agent=name, **over)
    return agents


# -- goal intake -------------------------------------------------------------------------
class GoalIntake(BackgroundLoop):
    """Consumes the goals topic (group `<group prefix>.intake`) and starts one session per
    goal with `Runtime.start_session(idempotency_key=…, correlation_id=…, reply_topic=…)`.
    A record's offset is committed after its session is in the log."""

    def __init__(self, log: Log, kbus: KafkaBus, group: str, agents: dict[str, SessionConfig],
                 publisher: ResultsPublisher, *, secrets: Any = (), poll_timeout: float = 0.2,
                 on_event: Callable[[ev.Event], None] | None = None) -> None:
        super().__init__(f"ls-{group}")
        self.label = "goal intake"
        self.log, self.kbus, self.group, self.agents = log, kbus, group, agents
        self.publisher = publisher
        self.runtime = Runtime(log, [], on_event=on_event, secrets=secrets)
        self.poll_timeout = poll_timeout
        self.relay: Any = None  # with `results=transactional`: the TransactionalResultsRelay
        self.started = 0

    def _loop(self) -> None:  # BackgroundLoop: start() runs this in a daemon thread
        from confluent_kafka import Consumer, TopicPartition

        self.publisher.producer.ensure_topic(self.kbus.goals_topic)
        consumer = Consumer({
            "bootstrap.servers": self.kbus.bootstrap, "group.id": self.group,
            "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "fetch.wait.max.ms": 100,
            **self.kbus.consumer_config,
        })
        consumer.subscribe([self.kbus.goals_topic])
        try:
            while not self._stop.is_set():
                msg = consumer.poll(self.poll_timeout)
                if msg is None:
                    continue
                if msg.error() is not None:
                    if msg.error().fatal():
                        raise LogError(f"goal intake: {msg.error()}")
                    continue
                position = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
                try:
                    self.accept(decode_goal(msg.value() or b""), position)
                except ContractError as exc:
                    logger.warning("goal intake: skipping %s: %s", position, exc)
                except Exception as exc:  # the log or the broker: try this record again
                    logger.warning("goal intake: %s failed, retrying: %s: %s", position, type(exc).__name__, exc)
                    try:
                        consumer.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))
                    except Exception:
                        pass
                    self._stop.wait(1.0)
                    continue
                consumer.commit(message=msg, asynchronous=False)
        finally:
            consumer.close()

    def accept(self, goal: Goal, position: str) -> str | None:
        """Start the goal's session (or nothing, for a known key); its session id."""
        key = goal.idempotency_key or position
        sid = session_id_for(key)
        corr = goal.correlation_id or key
        reply = goal.reply_topic or self.kbus.results_topic
        config = self.agents.get(goal.agent)
        if config is None:
            self.publisher.publish(reply, SessionUpdate(
                correlation_id=corr, session_id=sid, kind="result", status="rejected", seq=-1,
                event_type="GoalRejected", time=ev.now_ms(), idempotency_key=key,
                error=f"unknown agent {goal.agent!r}; known: {', '.join(sorted(self.agents))}",
            ))
            return None
        known = self.log.next_seq(sid) > 0
        if goal.progress:
            config = dataclasses.replace(config, extra={**config.extra, "progress_updates": True})
        self.runtime.start_session(goal.goal, config, idempotency_key=key, correlation_id=corr,
                                   reply_topic=reply, actor="goal-intake")
        if not known:
            self.started += 1
            return sid
        events = self.log.read(sid)
        state = fold(events)
        if state.terminal:  # answer the repeated goal too (deduplicating consumers drop it)
            self.publisher.publish(reply, result_update(events[-1], corr, key))
        return sid


# -- assembling a role -------------------------------------------------------------------
def processors_for(role: str, *, provider: Any = None, fallbacks: Sequence[Any] = (),
                   publisher: ResultsPublisher | None = None, allow_writes: bool = False) -> list[Processor]:
    from loopstream.processors.compaction import CompactionProcessor
    from loopstream.processors.model import ModelProcessor
    from loopstream.processors.orchestrator import Orchestrator
    from loopstream.processors.tools import ToolProcessor
    from loopstream.tools.registry import default_registry

    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    registry = default_registry(allow_writes=allow_writes)
    procs: list[Processor] = []
    if role in ("orchestrator", "all"):
        procs.append(Orchestrator())
    if role in ("model", "all"):
        procs += [ModelProcessor(provider, registry.specs(), fallbacks), CompactionProcessor(provider)]
    if role in ("tool", "all"):
        procs.append(ToolProcessor(registry, reviewer=provider))
    if publisher is not None and role in ("orchestrator", "all"):
        procs.append(publisher)
    return procs


@dataclass
class WorkerOptions:
    role: str
    bus: str | None = None
    db: Path | None = None
    provider: str | None = None
    model: str | None = None
    allow_writes: bool = False  # the tool role may run write_file, edit_file and shell
    base_url: str | None = None
    action_mode: str | None = None
    group_prefix: str | None = None
    concurrency: int = 8
    agents_file: Path | None = None
    on_event: Callable[[ev.Event], None] | None = None
    on_local_start: Callable[[], None] | None = None


@contextmanager
def open_role(opts: WorkerOptions) -> Iterator[tuple[Any, GoalIntake | None]]:
    """The Worker (not yet running) and the goal intake (not yet started) for a role."""
    import os

    from loopstream.core.agent import open_model
    from loopstream.core.bus import open_log
    from loopstream.core.worker import Worker

    if opts.role not in ROLES:
        raise ContractError(f"unknown role {opts.role!r}: one of {', '.join(ROLES)}")
    bus = opts.bus or os.environ.get("LOOPSTREAM_BUS") or None
    kbus = parse_kafka_url(bus) if bus and bus.startswith("kafka://") else None
    with ExitStack() as stack:
        log = open_log(bus, opts.db)
        stack.callback(log.close)
        provider = None
        # The model role calls the model; a tool role given a model uses it to review tool
        # calls for sessions whose guardrails ask for review.
        if opts.role in ("model", "all") or (opts.role == "tool" and (opts.provider or opts.model)):
            provider = stack.enter_context(open_model(opts.provider, opts.model, opts.base_url,
                                                      opts.action_mode, on_local_start=opts.on_local_start))
        publisher = intake = None
        if kbus is not None and opts.role in ("orchestrator", "all"):
            producer = ContractProducer(kbus.bootstrap)
            stack.callback(producer.close)
            transactional = kbus.results == "transactional"
            # results=transactional: results go through the relay (core/relay.py), the
            # publisher sends progress updates only.
            publisher = ResultsPublisher(log, producer, results=not transactional)
            agents = default_agents(
                provider.name if provider else (opts.provider or os.environ.get("LOOPSTREAM_PROVIDER") or "any"),
                provider.model if provider else (opts.model or os.environ.get("LOOPSTREAM_MODEL") or "default"),
                opts.agents_file,
            )
            intake = GoalIntake(log, kbus, kbus.group("intake", opts.group_prefix), agents, publisher,
                                on_event=opts.on_event)
            if transactional:
                from loopstream.core.relay import TransactionalResultsRelay

                intake.relay = TransactionalResultsRelay(kbus, log, kbus.group("results", opts.group_prefix),
                                                         goals=publisher.goals)
        group = kbus.group(opts.role, opts.group_prefix) if kbus else f"{opts.group_prefix or 'loopstream'}.{opts.role}"
        worker = Worker(log, processors_for(opts.role, provider=provider, publisher=publisher,
                                           allow_writes=opts.allow_writes), group,
                        concurrency=opts.concurrency, on_event=opts.on_event)
        yield worker, intake


def run_role(opts: WorkerOptions, install_signals: bool = True,
             on_ready: Callable[[Any, GoalIntake | None], None] | None = None) -> Any:
    """Run a role until SIGTERM/SIGINT; the worker (for its stats)."""
    import signal

    from loopstream.core.worker import install_signal_handlers

    early: list[int] = []  # a stop asked for while starting (e.g. loading the local model)
    if install_signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda n, _frame: early.append(n))
    with open_role(opts) as (worker, intake):
        relay = intake.relay if intake is not None else None
        helpers = [h for h in (intake, relay) if h is not None]
        if install_signals:
            install_signal_handlers(worker, *(h.stop for h in helpers))
            if early:  # the real handler stops the worker and its helpers; they close cleanly
                signal.raise_signal(early[0])
        for h in helpers:
            h.start()
        if on_ready is not None:
            on_ready(worker, intake)
        try:  # a dead goal intake (or results relay) stops the process (a supervisor restarts it)
            worker.run(until=(lambda: any(h.error is not None for h in helpers)) if helpers else None)
            if intake is not None and intake.error is not None:
                raise LogError(f"the goal intake stopped: {intake.error}")
            if relay is not None and relay.error is not None:
                raise LogError(f"the results relay stopped: {relay.error}")
        finally:
            for h in helpers:
                h.stop()
            if intake is not None:
                intake.join(10)
            if relay is not None:
                relay.join(relay.timeout + 5)  # it finishes the running transaction
        return worker


# -- submitting --------------------------------------------------------------------------
@dataclass
class Submitted:
    session_id: str
    correlation_id: str
    idempotency_key: str
    result: SessionUpdate | None = None


def submit_goal(bus: str, goal: Goal, *, wait: bool = False, timeout: float = 300.0,
                on_progress: Callable[[SessionUpdate], None] | None = None) -> Submitted:
    """Produce `goal` to the goals topic; with `wait`, consume its reply topic until the
    session's result arrives (LogError after `timeout` seconds)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    kbus = parse_kafka_url(bus)
    goal = dataclasses.replace(goal, idempotency_key=goal.idempotency_key or uuid.uuid4().hex,
                               submitted_ms=goal.submitted_ms or ev.now_ms())
    goal.correlation_id = goal.correlation_id or goal.idempotency_key
    goal.reply_topic = goal.reply_topic or kbus.results_topic
    sid = session_id_for(goal.idempotency_key)
    out = Submitted(sid, goal.correlation_id, goal.idempotency_key)
    producer = ContractProducer(kbus.bootstrap)
    consumer = None
    try:
        producer.ensure_topic(kbus.goals_topic)
        if wait:
            producer.ensure_topic(goal.reply_topic)
            consumer = Consumer({"bootstrap.servers": kbus.bootstrap, "group.id": f"loopstream-submit-{uuid.uuid4().hex}",
                                 "enable.auto.commit": False, "fetch.wait.max.ms": 50})
            parts = consumer.list_topics(goal.reply_topic, timeout=30).topics[goal.reply_topic].partitions
            try:  # start at the end: only updates produced after this goal can answer it
                ends = [TopicPartition(goal.reply_topic, p, consumer.get_watermark_offsets(
                    TopicPartition(goal.reply_topic, p), timeout=30, cached=False)[1]) for p in parts]
            except KafkaException as exc:
                raise LogError(f"cannot read the end of {goal.reply_topic}: {exc}") from exc
            consumer.assign(ends)
        producer.send(kbus.goals_topic, goal.idempotency_key, encode_goal(goal))
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
    return Runtime(log, []).start_session(goal.goal, config, idempotency_key=key,
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
