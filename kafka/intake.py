"""The goal intake: one session per Goal record on the goals topic.

A goal whose idempotency key already started a session starts nothing new; if that
session has ended, its result is sent again to the new goal's reply topic with the new
goal's correlation id (same session id and seq: deduplicating consumers drop it).

A goal names its agent: one of the project file's (`compose`, given by `loopstream worker`:
composed per goal as `run --agent` does, its SessionStart hooks run once, when the session is
first started), else one of `agents` (`default` and the `--agents` file's).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from loopstream.core import events as ev
from loopstream.core.log import Log, LogError, LogLost
from loopstream.core.state import fold
from loopstream.kafka import clients
from loopstream.kafka.background import BackgroundLoop
from loopstream.kafka.clients import CONTRACT, TopicPartition
from loopstream.kafka.contract import (
    ContractError,
    Goal,
    KafkaBus,
    SessionUpdate,
    UnreadableGoal,
    decode_goal,
    session_id_for,
    valid_topic,
)
from loopstream.kafka.results import ResultsPublisher, result_update
from loopstream.runtime.writer import SessionConfig, SessionWriter

logger = logging.getLogger("loopstream.intake")


class GoalIntake(BackgroundLoop):
    """Consumes the goals topic (group `<group prefix>.intake`) and starts one session per
    goal with `SessionWriter.start(idempotency_key=…, correlation_id=…, reply_topic=…)`.
    A record's offset is committed after its session is in the log."""

    def __init__(self, log: Log, kbus: KafkaBus, group: str, agents: dict[str, SessionConfig],
                 publisher: ResultsPublisher, *, secrets: Any = (), poll_timeout: float = 0.2,
                 on_event: Callable[[ev.Event], None] | None = None, registry: Any = None,
                 compose: Callable[[str, str], SessionConfig | None] | None = None) -> None:
        super().__init__(f"ls-{group}")
        self.compose = compose  # (agent, goal) -> a project agent's config (ValueError: its one-line problem)
        self.label = "goal intake"
        self.log, self.kbus, self.group, self.agents = log, kbus, group, agents
        self.publisher = publisher
        self.writer = SessionWriter(log, on_event=on_event, secrets=secrets)
        self.poll_timeout = poll_timeout
        self.relay: Any = None  # with `results=transactional`: the TransactionalResultsRelay
        # With a schema registry (kafka/registry.py RegistryContract): goals read by their writer's schema.
        self.decode: Callable[[bytes], Goal] = registry.decode_goal if registry is not None else decode_goal
        self.started = 0
        self.rejected = 0

    def _loop(self) -> None:  # BackgroundLoop: start() runs this in a daemon thread
        self.publisher.producer.ensure_topic(self.kbus.goals_topic, "goals")
        consumer = clients.member(self.kbus.bootstrap, self.group, CONTRACT, self.kbus.consumer_config,
                                  settings=self.kbus.settings)
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
                    try:
                        goal = self.decode(msg.value() or b"")
                    except UnreadableGoal as exc:
                        self.reject(msg, position, exc)
                    else:
                        self.accept(goal, position)
                except ContractError as exc:
                    logger.warning("goal intake: skipping %s: %s", position, exc)
                except LogLost:  # said once by the log; take no goal until it is restored
                    self._rewind(consumer, msg)
                    self._stop.wait(2.0)
                    continue
                except Exception as exc:  # the log or the broker: try this record again
                    logger.warning("goal intake: %s failed, retrying: %s: %s", position, type(exc).__name__, exc)
                    self._rewind(consumer, msg)
                    self._stop.wait(1.0)
                    continue
                consumer.commit(message=msg, asynchronous=False)
        finally:
            consumer.close()

    def reject(self, msg: Any, position: str, exc: UnreadableGoal) -> None:
        """A goal that cannot be read: to the dead-letter topic as it came, with the reason in
        header `ls.error` and its place in `ls.origin`; and, if enough of it was read to know
        where, a `rejected` result to its reply topic."""
        reason = str(exc)[:2000]
        logger.warning("goal intake: %s cannot be read (to %s): %s", position, self.kbus.dead_letter_topic, reason)
        headers = [*(msg.headers() or []), ("ls.error", reason.encode("utf-8", "replace")),
                   ("ls.origin", position.encode())]
        self.publisher.producer.send(self.kbus.dead_letter_topic, msg.key(), msg.value() or b"", headers=headers,
                                     kind="goals")
        self.rejected += 1
        partial = exc.partial
        if partial is None:
            return
        key = partial.get("idempotency_key") if isinstance(partial.get("idempotency_key"), str) else None
        key = key or position
        corr = partial.get("correlation_id") if isinstance(partial.get("correlation_id"), str) else None
        reply = partial.get("reply_topic") if valid_topic(partial.get("reply_topic")) else self.kbus.results_topic
        self._reject(reply, corr or key, session_id_for(key), key, f"unreadable goal: {reason}")

    @staticmethod
    def _rewind(consumer: Any, msg: Any) -> None:
        try:
            consumer.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))
        except Exception:
            pass

    def _config(self, agent: str, goal: str) -> SessionConfig | None:
        composed = self.compose(agent, goal) if self.compose is not None else None
        return composed if composed is not None else self.agents.get(agent)

    def _reject(self, reply: str, corr: str, sid: str, key: str, error: str) -> None:
        self.publisher.publish(reply, SessionUpdate(
            correlation_id=corr, session_id=sid, kind="result", status="rejected", seq=-1,
            event_type="GoalRejected", time=ev.now_ms(), idempotency_key=key, error=error[:2000]))
        return None

    def accept(self, goal: Goal, position: str) -> str | None:
        """Start the goal's session (or nothing, for a known key); its session id."""
        key = goal.idempotency_key or position
        sid = session_id_for(key)
        corr = goal.correlation_id or key
        reply = goal.reply_topic or self.kbus.results_topic
        known = self.log.next_seq(sid) > 0
        try:  # a known session is not composed again (its SessionStart hooks ran once)
            config = None if known else self._config(goal.agent, goal.goal)
        except ValueError as exc:
            return self._reject(reply, corr, sid, key, str(exc))
        if config is None and not known:
            return self._reject(reply, corr, sid, key,
                                f"unknown agent {goal.agent!r}; known: {', '.join(sorted(self.agents))}")
        if not known:
            if goal.progress:
                config = dataclasses.replace(config, policy=config.policy.updated({"progress_updates": True}))
            self.writer.start(goal.goal, config, idempotency_key=key, correlation_id=corr,
                              reply_topic=reply, actor="goal-intake")
            self.started += 1
            return sid
        events = self.log.read(sid)
        state = fold(events)
        if state.terminal:  # answer the repeated goal too (deduplicating consumers drop it)
            self.publisher.publish(reply, result_update(events[-1], corr, key))
        return sid


