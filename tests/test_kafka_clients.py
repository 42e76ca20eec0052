"""One Kafka client factory (kafka/clients.py): every client the package makes comes from
it, with the settings written there, and the bus URL's consumer settings reach the
consumers that should get them."""
from __future__ import annotations

import ast
import uuid
from pathlib import Path

import pytest

pytest.importorskip("confluent_kafka", reason="needs confluent-kafka")

from confluent_kafka import TopicPartition

from loopstream.kafka import clients
from loopstream.kafka.log import KafkaLog
from loopstream.kafka.settings import KafkaConfigError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ("api", "cli", "core", "kafka", "processors", "providers", "replay", "runtime", "tools")
CLASSES = {"Producer", "Consumer", "AdminClient"}


def test_only_the_factory_imports_confluent_kafka() -> None:
    found = []
    for path in sorted(p for folder in PACKAGE for p in (ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "confluent_kafka" for n in names):
                found.append(str(path.relative_to(ROOT)))
    assert set(found) <= {"kafka/clients.py", "kafka/registry.py"}, found  # registry.py: its HTTP client


def test_each_client_class_is_built_in_one_factory_function_from_config() -> None:
    """Inside clients.py a client class is constructed only by `_build`, and handed to it only by
    its factory function, always with `config(...)` (or by `check`, which validates settings):
    no construction can skip the settings."""
    tree = ast.parse((ROOT / "kafka" / "clients.py").read_text())
    calls, direct = [], []
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            if node.func.id in CLASSES:
                direct.append(fn.name)
            if node.func.id == "_build" and isinstance(node.args[0], ast.Name) and node.args[0].id in CLASSES:
                arg = node.args[2]
                via_config = isinstance(arg, ast.Call) and getattr(arg.func, "id", "") == "config"
                calls.append((fn.name, node.args[0].id, via_config))
    assert direct == []  # `_build` calls `cls(...)`, never a class by name
    assert sorted(calls) == [("admin", "AdminClient", True), ("member", "Consumer", True),
                             ("producer", "Producer", True), ("reader", "Consumer", True)]


def test_producers_are_idempotent_with_acks_all_and_a_delivery_timeout() -> None:
    conf = clients.config("producer", "b:1", {"message.timeout.ms": 5000})
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"
    assert conf["bootstrap.servers"] == "b:1" and conf["message.timeout.ms"] == 5000
    assert "transactional.id" not in conf


def test_group_members_commit_by_hand_from_the_earliest_offset() -> None:
    conf = clients.config("member", "b:1", {"group.id": "g", "isolation.level": clients.EVENTS},
                          {"session.timeout.ms": "2000"})
    assert conf["enable.auto.commit"] is False and conf["enable.auto.offset.store"] is False
    assert conf["auto.offset.reset"] == "earliest"
    assert conf["isolation.level"] == "read_uncommitted" and conf["group.id"] == "g"
    assert conf["session.timeout.ms"] == "2000"  # the bus URL's setting wins over the default 6000
    assert clients.config("member", "b:1")["session.timeout.ms"] == 6000


def test_readers_never_commit_and_see_the_end_of_each_partition() -> None:
    conf = clients.config("reader", "b:1")
    assert conf["enable.auto.commit"] is False and conf["enable.partition.eof"] is True
    assert conf["fetch.wait.max.ms"] == 10  # the Tansu latency workaround (docs/kafka.md)


def test_events_are_read_uncommitted_and_the_contract_read_committed() -> None:
    assert (clients.EVENTS, clients.CONTRACT) == ("read_uncommitted", "read_committed")


@pytest.mark.kafka
def test_the_bus_settings_reach_the_subscription_consumer_and_not_the_others(kafka_broker: str) -> None:
    """An invalid consumer setting is refused by librdkafka when the subscription's consumer
    is built, so it reaches it; the producer and the projection's readers do not get it."""
    bad = {"session.timeout.ms": "not-a-number"}
    with KafkaLog(kafka_broker, topic="t." + uuid.uuid4().hex[:12], consumer_config=bad) as log:
        with pytest.raises(KafkaConfigError, match="session.timeout.ms"):
            log.subscribe("g-" + uuid.uuid4().hex[:8])
    with pytest.raises(KafkaConfigError, match="message.timeout.ms"):
        KafkaLog(kafka_broker, topic="t." + uuid.uuid4().hex[:12], producer_config={"message.timeout.ms": "x"})


@pytest.mark.kafka
def test_a_transactional_producer_from_the_factory_works_on_the_broker(kafka_broker: str) -> None:
    """The relay's producer: the factory's settings plus a transactional id (librdkafka
    refuses a transactional producer whose settings contradict idempotence)."""
    topic = "t." + uuid.uuid4().hex[:12]
    clients.ensure_topic(clients.admin(kafka_broker), topic, 1)
    p = clients.producer(kafka_broker, timeout=10, transactional_id="tx-" + uuid.uuid4().hex[:8])
    try:
        p.init_transactions(10)
        p.begin_transaction()
        p.produce(topic, b"v")
        p.commit_transaction(10)
    finally:
        clients.close(p)
    r = clients.reader(kafka_broker, "test", clients.CONTRACT)
    try:
        r.assign([TopicPartition(topic, 0, 0)])
        got = None
        for _ in range(100):
            m = r.poll(0.2)
            if m is not None and m.error() is None:
                got = m.value()
                break
        assert got == b"v"
    finally:
        r.close()


def test_ensure_topic_is_defined_once() -> None:
    defs = [str(p.relative_to(ROOT)) for folder in PACKAGE for p in (ROOT / folder).rglob("*.py")
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.FunctionDef)
            and n.name in ("ensure_topic", "_ensure_topic")]
    assert set(defs) == {"kafka/clients.py"}, defs


@pytest.mark.kafka
def test_lag_counts_the_records_a_group_has_not_committed(kafka_broker: str) -> None:
    """The lag the metrics report (kafka/ops.py): per partition, the high watermark minus the
    group's committed offset (everything, for a group without a commit)."""
    topic, group = "t." + uuid.uuid4().hex[:12], "g-" + uuid.uuid4().hex[:8]
    clients.ensure_topic(clients.admin(kafka_broker), topic, 2)
    p = clients.producer(kafka_broker, timeout=10)
    for i in range(5):  # one record per batch: Tansu's high watermark counts a batch of 5 as 1
        p.produce(topic, b"v", partition=0)
        assert p.flush(10) == 0
    clients.close(p)
    lagging = clients.reader(kafka_broker, "lag", clients.EVENTS, group=group)
    committer = clients.reader(kafka_broker, "lag", clients.EVENTS, group=group)
    try:
        assert clients.lag(lagging, topic) == {0: 5, 1: 0}
        committer.commit(offsets=[TopicPartition(topic, 0, 2)], asynchronous=False)
        assert clients.lag(lagging, topic) == {0: 3, 1: 0}
    finally:
        lagging.close()
        committer.close()
