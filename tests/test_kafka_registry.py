"""The goal contract over a Schema Registry (confluent-kafka's serializers and its in-process
`mock://` registry): a compatible evolved goal is read by Avro schema resolution, an
unreadable one goes to the dead-letter topic with its reason (and a `rejected` reply), and
results are framed so that a registry deserializer reads them (on Tansu)."""
from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("confluent_kafka.schema_registry.avro", reason="needs confluent-kafka[avro,schemaregistry]")

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from loopstream.kafka.contract import CONTRACT_DIR, Goal, UnreadableGoal, encode_goal, session_id_for
from loopstream.kafka.registry import RegistryContract, client_for, subject
from loopstream.kafka.roles import WorkerOptions, open_role
from loopstream.kafka.settings import KafkaConfigError, KafkaSettings, RegistrySettings, load
from tests.helpers import wait_for

GOAL = json.loads((CONTRACT_DIR / "goal.avsc").read_text())
# A compatible evolution (what another team's producer may register): a new field with a
# default, a field of ours left out (its default applies), the fields in another order.
EVOLVED = {"type": "record", "name": "Goal", "namespace": "loopstream.contract", "fields": [
    {"name": "priority", "type": "int", "default": 0},
    {"name": "reply_topic", "type": ["null", "string"], "default": None},
    {"name": "goal", "type": "string"},
    {"name": "idempotency_key", "type": ["null", "string"], "default": None},
    {"name": "correlation_id", "type": ["null", "string"], "default": None},
]}
# Not readable as a Goal: the goal text became a number (no Avro promotion int -> string).
BROKEN = {"type": "record", "name": "Goal", "namespace": "loopstream.contract", "fields": [
    {"name": "goal", "type": "int"},
    {"name": "reply_topic", "type": ["null", "string"], "default": None},
    {"name": "correlation_id", "type": ["null", "string"], "default": None},
]}


def framed(registry_url: str, topic: str, schema: dict, record: dict) -> bytes:
    """A record as a registry producer writes it (registered under the topic's subject)."""
    client = client_for(RegistrySettings(registry_url))
    ser = AvroSerializer(client, json.dumps(schema), conf={"auto.register.schemas": True,
                                                            "normalize.schemas": False})
    return ser(record, SerializationContext(topic, MessageField.VALUE))


def test_an_evolved_goal_is_read_by_schema_resolution_and_a_broken_one_is_refused() -> None:
    url = f"mock://unit-{uuid.uuid4().hex[:6]}"
    contract = RegistryContract(RegistrySettings(url), "p.goals", "p.results")
    client = client_for(RegistrySettings(url))
    assert client.get_latest_version(subject("p.goals")).schema_id == contract.goal_id
    goal = contract.decode_goal(framed(url, "other.goals", EVOLVED, {
        "priority": 7, "reply_topic": "r", "goal": "add 2 and 3", "idempotency_key": "k1", "correlation_id": None}))
    assert goal == Goal(goal="add 2 and 3", agent="default", idempotency_key="k1", reply_topic="r")
    assert contract.decode_goal(encode_goal(Goal("plain"))).goal == "plain"  # plain Avro still works
    with pytest.raises(UnreadableGoal, match="cannot be read as a Goal") as caught:
        contract.decode_goal(framed(url, "other2.goals", BROKEN, {"goal": 5, "reply_topic": "r9",
                                                                   "correlation_id": "c9"}))
    assert caught.value.partial == {"goal": 5, "reply_topic": "r9", "correlation_id": "c9"}
    with pytest.raises(UnreadableGoal, match="not in the registry"):
        contract.decode_goal(b"\x00\x00\x00\x7f\xff" + b"\x02a")
    with pytest.raises(UnreadableGoal, match="empty") as caught:
        contract.decode_goal(framed(url, "other.goals", EVOLVED, {"goal": " ", "priority": 1}))
    assert caught.value.partial is not None


def test_the_registry_is_configured_by_file_or_flag(tmp_path: Path) -> None:
    f = tmp_path / "k.toml"
    (tmp_path / "auth").write_text("user:secret\n")
    f.write_text(f'[kafka.registry]\nurl = "https://sr:8081"\n"basic.auth.user.info_file" = "{tmp_path / "auth"}"\n')
    reg = load(f, environ={}).registry
    assert reg.url == "https://sr:8081" and reg.conf()["basic.auth.user.info"] == "user:secret"
    assert "secret" not in repr(load(f, environ={}))
    f.write_text('[kafka.registry]\nurl = "https://sr:8081"\n"basic.auth.user.info" = "u:p"\n')
    with pytest.raises(KafkaConfigError, match="read from a file"):
        load(f, environ={})
    f.write_text('[kafka.registry]\nulr = "https://sr:8081"\n')
    with pytest.raises(KafkaConfigError, match="did you mean 'url'"):
        load(f, environ={})
    assert KafkaSettings().with_registry("mock://x").registry.url == "mock://x"
    with pytest.raises(KafkaConfigError):
        KafkaSettings().with_registry("ftp://x")


@pytest.mark.kafka
def test_goals_and_results_through_the_registry_on_tansu(kafka_broker: str, tmp_path: Path) -> None:
    prefix, url = f"reg{uuid.uuid4().hex[:8]}", f"mock://tansu-{uuid.uuid4().hex[:6]}"
    settings = KafkaSettings().with_registry(url)
    bus = f"kafka://{kafka_broker}?prefix={prefix}&session.timeout.ms=2000&heartbeat.interval.ms=500"
    opts = WorkerOptions(role="all", bus=bus, db=tmp_path / "p.db", provider="scripted", model="adder:2",
                         kafka=settings)
    with open_role(opts) as (worker, intake):
        intake.start()
        runner = threading.Thread(target=worker.run, daemon=True)
        runner.start()
        try:
            producer = Producer({"bootstrap.servers": kafka_broker})
            good = framed(url, f"{prefix}.goals", EVOLVED, {"priority": 1, "reply_topic": None, "goal": "add 2 and 3",
                                                            "idempotency_key": "good-1", "correlation_id": "c-good"})
            bad = framed(url, f"{prefix}.goals", BROKEN, {"goal": 4, "reply_topic": None, "correlation_id": "c-bad"})
            producer.produce(f"{prefix}.goals", key=b"bad", value=bad, headers=[("trace", b"t1")])
            producer.produce(f"{prefix}.goals", key=b"good-1", value=good)
            assert producer.flush(10) == 0

            deserialize = AvroDeserializer(client_for(RegistrySettings(url)))
            results: dict[str, dict] = {}

            def read_results() -> bool:
                for m in drain(kafka_broker, f"{prefix}.results"):
                    assert m.value()[0] == 0  # framed: magic byte, schema id
                    u = deserialize(m.value(), SerializationContext(m.topic(), MessageField.VALUE))
                    results[u["correlation_id"]] = u
                return {"c-good", "c-bad"} <= set(results)

            assert wait_for(read_results, 90), results
            assert results["c-good"]["status"] == "done" and results["c-good"]["answer"] == "The result is 2."
            assert results["c-good"]["session_id"] == session_id_for("good-1")
            assert results["c-bad"]["status"] == "rejected" and "cannot be read as a Goal" in results["c-bad"]["error"]
            (dead,) = drain(kafka_broker, f"{prefix}.goals.dlq")
            headers = dict(dead.headers())
            assert dead.value() == bad and dead.key() == b"bad" and headers["trace"] == b"t1"
            assert b"cannot be read as a Goal" in headers["ls.error"]
            assert headers["ls.origin"].startswith(f"{prefix}.goals/".encode())
            assert intake.rejected == 1 and intake.started == 1
            registered = client_for(RegistrySettings(url)).get_latest_version(subject(f"{prefix}.results"))
            assert json.loads(registered.schema.schema_str)["name"] == "SessionUpdate"
        finally:
            worker.stop()
            intake.stop()
            runner.join(30)
            intake.join(10)


def drain(broker: str, topic: str) -> list:
    """Every record of `topic` now (from the start of each partition)."""
    c = Consumer({"bootstrap.servers": broker, "group.id": f"t-{uuid.uuid4().hex}", "enable.partition.eof": True,
                  "auto.offset.reset": "earliest"})
    try:
        md = c.list_topics(topic, timeout=10).topics.get(topic)
        if md is None or md.error is not None:
            return []
        c.assign([TopicPartition(topic, p, 0) for p in md.partitions])
        out, eof, deadline = [], set(), time.monotonic() + 10
        while len(eof) < len(md.partitions) and time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is None:
                continue
            if m.error() is not None:
                eof.add(m.partition())
                continue
            out.append(m)
        return out
    finally:
        c.close()


