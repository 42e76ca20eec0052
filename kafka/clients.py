"""Kafka clients: the contract producer (goals, updates) and topic creation."""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from loopstream.core.log import LogError


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


