"""Opt-in exactly-once results (`kafka://…?results=transactional`): a consume-transform-produce
relay that publishes the results of goal-started sessions and commits its consumer offsets
in one Kafka transaction per polled batch. How it works, and the Tansu quirks that shape it
(a batch without results is committed without a transaction): docs/kafka.md."""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from loopstream.core.log import Delivery, LogError
from loopstream.kafka import clients
from loopstream.kafka.background import BackgroundLoop
from loopstream.kafka.clients import KafkaException, ensure_topic
from loopstream.kafka.contract import KafkaBus, SessionUpdate, encode_update
from loopstream.kafka.results import GoalLookup, goal_result, update_headers
from loopstream.kafka.settings import KafkaSettings

logger = logging.getLogger("loopstream.relay")


class TransactionalResultsRelay(BackgroundLoop):
    """Relay the results of goal-started sessions from `log` (a KafkaLog) in Kafka
    transactions, as consumer group `group` (docs/kafka.md). `start()` runs
    it in a thread; `run()` runs it in the caller's."""

    def __init__(
        self,
        bootstrap: str | KafkaBus,
        log: Any,
        group: str,
        *,
        transactional_id: str | None = None,
        timeout: float = 30.0,
        poll_max: int = 200,
        poll_timeout: float = 0.2,
        retry_delay: float = 1.0,
        producer_config: dict[str, Any] | None = None,
        goals: GoalLookup | None = None,
        settings: KafkaSettings | None = None,
    ) -> None:
        super().__init__(f"ls-{group}")
        self.bootstrap = bootstrap.bootstrap if isinstance(bootstrap, KafkaBus) else bootstrap
        self.log, self.group = log, group
        self.transactional_id = transactional_id or f"{group}.relay"
        self.timeout, self.poll_max, self.poll_timeout = timeout, poll_max, poll_timeout
        self.retry_delay = retry_delay
        self.settings = settings or (bootstrap.settings if isinstance(bootstrap, KafkaBus) else
                                     getattr(log, "settings", None)) or clients.default_settings()
        self.producer_config = dict(producer_config or {})
        self.goals = goals or GoalLookup(log)
        self.stats: Counter = Counter()
        self.label = f"results relay {group}"
        self._topics: set[str] = set()
        self._admin: Any = None
        # (topic, update) -> bytes: plain Avro, or framed by a schema registry (kafka/registry.py)
        self.encode = lambda _topic, update: encode_update(update)

    def _loop(self) -> None:  # BackgroundLoop: start() runs this in a daemon thread
        self.run()

    # -- the loop --------------------------------------------------------------------
    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Poll and relay, one transaction per polled batch, until `stop()` (or `until()`)."""
        self._admin = clients.admin(self.bootstrap, self.settings)
        producer = clients.producer(self.bootstrap, timeout=self.timeout, transactional_id=self.transactional_id,
                                    overrides=self.producer_config, settings=self.settings)
        sub = None
        try:
            try:  # fences an older relay with this id and aborts what it left open
                producer.init_transactions(self.timeout)
            except KafkaException as exc:
                raise LogError(f"results relay {self.group}: init_transactions failed: {exc}") from exc
            sub = self.log.subscribe(self.group)
            while not self._stop.is_set() and not (until is not None and until()):
                try:
                    deliveries = sub.poll(max_events=self.poll_max, timeout=self.poll_timeout)
                except LogError as exc:
                    logger.warning("results relay %s: poll failed: %s", self.group, exc)
                    self._stop.wait(self.retry_delay)
                    continue
                if deliveries:
                    self._relay(producer, sub, deliveries)
        finally:
            if sub is not None:
                try:
                    sub.close()
                except Exception as exc:
                    logger.warning("results relay %s: closing the subscription: %s", self.group, exc)
            clients.close(producer)

    def _relay(self, producer: Any, sub: Any, deliveries: Sequence[Delivery]) -> None:
        try:
            updates = [found for d in deliveries if (found := goal_result(self.goals, d.event)) is not None]
            for topic in {t for t, _ in updates}:
                if topic not in self._topics:
                    ensure_topic(self._admin, topic, self.settings.topics.spec("results"), self.timeout)
                    self._topics.add(topic)
        except LogError as exc:  # nothing begun yet: deliver the batch again later
            logger.warning("results relay %s: %s; retrying", self.group, exc)
            sub.rewind(deliveries)
            self._stop.wait(self.retry_delay)
            return
        if not updates:
            self._commit(sub, deliveries)
            return
        try:
            producer.begin_transaction()
            for topic, update in updates:
                self._produce(producer, topic, update, self.encode(topic, update))
            producer.send_offsets_to_transaction(sub.offsets_after(deliveries), sub.consumer_group_metadata(),
                                                 self.timeout)
            producer.commit_transaction(self.timeout)
        except (KafkaException, BufferError) as exc:
            err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
            if err is not None and err.fatal():
                raise LogError(f"results relay {self.group}: fatal transaction error: {err}") from exc
            self.stats["aborts"] += 1
            logger.warning("results relay %s: transaction failed, aborting and retrying: %s", self.group, exc)
            try:
                producer.abort_transaction(self.timeout)
            except KafkaException as abort_exc:
                raise LogError(f"results relay {self.group}: abort failed: {abort_exc}") from abort_exc
            sub.rewind(deliveries)
            self._stop.wait(self.retry_delay)
            return
        self.stats["transactions"] += 1
        self.stats["deliveries"] += len(deliveries)
        self.stats["results"] += len(updates)

    def _commit(self, sub: Any, deliveries: Sequence[Delivery]) -> None:
        """Commit the position past a batch without results: a plain consumer commit (nothing
        to make atomic; Tansu drops the offsets of such a transaction, see docs/kafka.md)."""
        last: dict[int, Delivery] = {}
        for d in deliveries:
            if d.position[0] not in last or d.position[1] > last[d.position[0]].position[1]:
                last[d.position[0]] = d
        try:
            for d in last.values():
                sub.commit(d)
        except LogError as exc:  # e.g. revoked meanwhile: deliver the batch again (it has no results)
            logger.warning("results relay %s: %s; retrying", self.group, exc)
            sub.rewind(deliveries)
            self._stop.wait(self.retry_delay)
            return
        self.stats["commits"] += 1
        self.stats["deliveries"] += len(deliveries)

    @staticmethod
    def _produce(producer: Any, topic: str, update: SessionUpdate, value: bytes) -> None:
        while True:
            try:
                producer.produce(topic, key=update.session_id.encode(), value=value,
                                 headers=update_headers(update))
                return
            except BufferError:  # the local queue is full: let it drain into the transaction
                producer.poll(0.1)
