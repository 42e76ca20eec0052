"""Every Kafka client loopstream makes: the settings, one factory, `ensure_topic`, and the
producer of the goal contract. The only module that imports confluent-kafka (a test checks).

Each client is `{"bootstrap.servers": …, **SETTINGS[kind], **what the caller adds}`: a
consumer group or a name, a transactional id, the isolation level of the topic it reads,
and the overrides of the bus URL (`kafka://…?session.timeout.ms=2000`, consumers only).
Why each setting is what it is: docs/kafka.md.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from loopstream.core.log import LogError

try:  # the [kafka] extra; without it this module still imports (a SQLite-only install)
    from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic
except ImportError:  # pragma: no cover - exercised only without the extra
    Consumer = Producer = AdminClient = NewTopic = TopicPartition = KafkaError = None  # type: ignore[assignment,misc]

    class KafkaException(Exception):  # type: ignore[no-redef]
        """Stands in for confluent_kafka.KafkaException in `except` clauses."""

SETTINGS: dict[str, dict[str, Any]] = {
    # Every producer: events (KafkaLog), goals and updates (ContractProducer), the relay.
    "producer": {
        # The broker drops the duplicates librdkafka's own retries would write, and keeps
        # one producer's records in order: the acceptance rule relies on that order to give
        # up on an incomplete batch as soon as a later record of its writer lands.
        "enable.idempotence": True,
        # Acknowledged = written to every in-sync replica (idempotence requires "all").
        "acks": "all",
        # Records produced within 5 ms travel together (one append's batch, one request).
        "linger.ms": 5,
    },
    # A member of a consumer group: log subscriptions (the worker roles, the relay), the goal intake.
    "member": {
        # Offsets are committed by hand once a record is handled (at-least-once), never on
        # a timer and never on poll: a crash redelivers whatever was not finished.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        # A group without a committed offset starts at the beginning: it owes everything.
        "auto.offset.reset": "earliest",
        # The smallest session timeout a stock Kafka broker accepts: a dead member's
        # partitions go to the others after 6 s. Tansu answers a JoinGroup only after about
        # half of it, so it also bounds how long a member waits to join.
        "session.timeout.ms": 6_000,
        "heartbeat.interval.ms": 1_000,
        # How long the broker may hold a fetch that has no new data.
        "fetch.wait.max.ms": 100,
    },
    # Partitions assigned by hand, no group membership, never commits: the projection's
    # tail, watermark queries, `submit --wait` reading the reply topic.
    "reader": {
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        # An event at the end of each partition: the projection knows it has caught up.
        "enable.partition.eof": True,
        # Tansu does not answer a waiting fetch when data arrives (with 500 ms a new record
        # took ~200 ms to show up), so this bounds every catch-up of the projection, and so
        # every append. Real Kafka answers at once: raise it there to save idle requests
        # (at 10 ms an idle log costs ~1% CPU here).
        "fetch.wait.max.ms": 10,
    },
    "admin": {},
}

# Events are never produced in transactions (the acceptance rule decides what is in the
# log): their readers wait for none. Goals and results may come from transactions (another
# system's, the results relay): their readers skip aborted records.
EVENTS, CONTRACT = "read_uncommitted", "read_committed"


def config(kind: str, bootstrap: str, *layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The librdkafka settings of a client of `kind` (a key of SETTINGS), then `layers` in order."""
    out = {"bootstrap.servers": bootstrap, **SETTINGS[kind]}
    for layer in layers:
        out.update(layer or {})
    return out


def _require() -> None:
    if Producer is None:
        raise LogError("the Kafka bus needs the [kafka] extra: pip install 'loopstream[kafka]'")


def producer(bootstrap: str, *, timeout: float = 30.0, transactional_id: str | None = None,
             overrides: Mapping[str, Any] | None = None) -> Any:
    """An idempotent producer; `timeout` bounds the delivery of each record."""
    _require()
    own = {"message.timeout.ms": int(timeout * 1000)}
    if transactional_id:
        own["transactional.id"] = transactional_id
    return Producer(config("producer", bootstrap, own, overrides))


def member(bootstrap: str, group: str, isolation: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """A consumer in group `group` (subscribe it; commit by hand)."""
    _require()
    return Consumer(config("member", bootstrap, {"group.id": group, "isolation.level": isolation}, overrides))


def reader(bootstrap: str, name: str, isolation: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """A consumer of partitions assigned by hand; `name` starts its group id (never joined)."""
    _require()
    own = {"group.id": f"{name}-{uuid.uuid4().hex[:12]}", "isolation.level": isolation}
    return Consumer(config("reader", bootstrap, own, overrides))


def admin(bootstrap: str) -> Any:
    _require()
    return AdminClient(config("admin", bootstrap))


def metadata(admin_client: Any, topic: str | None = None, timeout: float = 30.0) -> Any:
    """The cluster's metadata (of `topic` only, if given); a broker that cannot be reached is a
    LogError saying so in one line, not librdkafka's exception."""
    try:
        return admin_client.list_topics(topic, timeout=timeout) if topic else admin_client.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise LogError(f"cannot reach the Kafka broker ({exc.args[0].str()}): is one running at the --bus "
                       "address?") from None


def ensure_topic(admin_client: Any, topic: str, partitions: int = 3, timeout: float = 30.0) -> int:
    """Create `topic` unless it exists; wait until metadata shows it; its partition count."""
    md = metadata(admin_client, timeout=timeout)
    if topic not in md.topics or md.topics[topic].error is not None:
        fut = admin_client.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        try:
            fut[topic].result(timeout=timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise LogError(f"cannot create topic {topic}: {exc}") from exc
    deadline = time.monotonic() + timeout
    while True:
        t = metadata(admin_client, topic, timeout).topics.get(topic)
        if t is not None and t.error is None and t.partitions:
            return len(t.partitions)
        if time.monotonic() > deadline:
            raise LogError(f"topic {topic} did not appear")
        time.sleep(0.05)


class ContractProducer:
    """The producer of goals and updates; `send` returns once the broker acknowledged."""

    def __init__(self, bootstrap: str, *, timeout: float = 30.0, partitions: int = 3) -> None:
        self.timeout, self.partitions = timeout, partitions
        self._admin = admin(bootstrap)
        self._producer = producer(bootstrap, timeout=timeout)
        self._topics: set[str] = set()

    def ensure_topic(self, topic: str) -> None:
        if topic in self._topics:
            return
        ensure_topic(self._admin, topic, self.partitions, self.timeout)
        self._topics.add(topic)

    def send(self, topic: str, key: str, value: bytes, headers: Sequence[tuple[str, bytes]] = ()) -> None:
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
        close(self._producer)


def close(client: Any) -> None:
    """Release a producer's connections now, not at garbage collection (brokers such as
    Tansu wait for open connections when they shut down). Producer.close is new in 2.x."""
    getattr(client, "close", lambda: None)()
