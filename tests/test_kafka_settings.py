"""Deployment settings for Kafka (kafka/settings.py): librdkafka properties from a file and the
environment, secrets from files, applied by the one factory to every client kind; topics
created with explicit configs and checked when they exist (docs/kafka.md#settings)."""
from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import pytest

from loopstream.kafka import settings as ks
from loopstream.kafka.contract import ContractError, parse_kafka_url
from loopstream.kafka.settings import KafkaConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "kafka.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- reading the settings ------------------------------------------------------------------
def test_file_tables_env_variables_and_secret_files(tmp_path: Path) -> None:
    secret = write(tmp_path, "s3cr3t\n", "password")
    path = write(tmp_path, f"""
[kafka.client]
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "SCRAM-SHA-512"
"sasl.username" = "file-user"
"sasl.password_file" = "{secret}"
[kafka.consumer]
"session.timeout.ms" = 10000
[kafka.topics]
partitions = 6
replication_factor = 3
min_insync_replicas = 2
""")
    env = {"LOOPSTREAM_KAFKA_SASL_USERNAME": "env-user", "LOOPSTREAM_KAFKA_PRODUCER_LINGER_MS": "20",
           "LOOPSTREAM_KAFKA_CONSUMER_GROUP_INSTANCE_ID": "model-1", "LOOPSTREAM_KAFKA_CONFIG": str(path),
           "LOOPSTREAM_OTHER": "x"}
    s = ks.load(environ=env)
    producer, consumer, admin = s.properties("producer"), s.properties("consumer"), s.properties("admin")
    assert producer["sasl.password"] == consumer["sasl.password"] == admin["sasl.password"] == "s3cr3t"
    assert admin["sasl.username"] == "env-user"  # the environment over the file
    assert producer["linger.ms"] == "20" and "linger.ms" not in consumer
    assert consumer["session.timeout.ms"] == 10000 and "session.timeout.ms" not in producer
    assert consumer["group.instance.id"] == "model-1" and "group.instance.id" not in admin
    assert (s.topics.partitions, s.topics.replication_factor, s.topics.partitions_set) == (6, 3, True)
    assert s.topics.configs("events") == {"cleanup.policy": "delete", "retention.ms": "-1",
                                          "retention.bytes": "-1", "min.insync.replicas": "2"}
    assert s.topics.configs("goals")["retention.ms"] == str(7 * ks.DAY_MS)
    assert "s3cr3t" not in repr(s) and "sasl.password" in repr(s)
    env2 = {"LOOPSTREAM_KAFKA_SASL_PASSWORD_FILE": str(secret)}
    assert ks.load(environ=env2).properties("admin") == {"sasl.password": "s3cr3t"}
    assert ks.load(environ={}) == ks.KafkaSettings()


@pytest.mark.parametrize("text, message", [
    ('[kafka.clients]\n"a.b" = 1', r"kafka\.clients: unknown table; did you mean 'client'\?"),
    ("[kafka.topics]\npartiton = 3", r"kafka\.topics\.partiton: unknown key; did you mean 'partitions'\?"),
    ("[kafka.topics]\npartitions = 0", r"must be at least 1"),
    ('[kafka.topics]\nreplication_factor = "3"', r"expected an integer"),
    ('[kafka.producer]\nacks = "1"', r"kafka\.producer: acks: loopstream sets this itself"),
    ('[kafka.client]\n"sasl.password_file" = "/nonexistent/pw"', r"cannot read /nonexistent/pw"),
    ("[kafka.client\n", r"not valid TOML"),
])
def test_a_bad_file_is_one_line_naming_the_place(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(KafkaConfigError, match=message) as info:
        ks.load(write(tmp_path, text), environ={})
    assert "\n" not in str(info.value)


def test_misspelt_or_refused_properties_are_found_before_connecting() -> None:
    pytest.importorskip("confluent_kafka")
    from loopstream.kafka import clients

    with pytest.raises(KafkaConfigError, match=r"No such configuration property: \"sasl.pasword\"; did you mean "
                                               r"'sasl.password'\? \(settings from environment\)"):
        clients.check(ks.load(environ={"LOOPSTREAM_KAFKA_SASL_PASWORD": "x"}))
    with pytest.raises(KafkaConfigError, match=r"kafka producer client: Invalid value \"TLS\" for configuration "
                                               r"property \"security.protocol\""):
        clients.check(ks.load(environ={"LOOPSTREAM_KAFKA_SECURITY_PROTOCOL": "TLS"}))
    sasl = {"LOOPSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "LOOPSTREAM_KAFKA_SASL_MECHANISM": "PLAIN"}
    with pytest.raises(KafkaConfigError, match=r"sasl.username and sasl.password must be set"):
        clients.check(ks.load(environ=sasl))
    clients.check(ks.load(environ={**sasl, "LOOPSTREAM_KAFKA_SASL_USERNAME": "u", "LOOPSTREAM_KAFKA_SASL_PASSWORD": "p"}))


@pytest.mark.parametrize("url", ["kafka://user:pw@b:9092", "kafka://b:9092?sasl.password=pw",
                                 "kafka://b:9092?sasl.jaas.config=x", "kafka://b:9092?ssl.key.password=pw"])
def test_credentials_in_the_url_are_refused(url: str) -> None:
    with pytest.raises(ContractError, match=r"shows in `ps`"):
        parse_kafka_url(url, ks.KafkaSettings())
    assert parse_kafka_url("kafka://b:9092?session.timeout.ms=2000").consumer_config == {"session.timeout.ms": "2000"}


def test_the_cli_refuses_bad_settings_in_one_line_with_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from loopstream.cli.app import app

    bad = write(tmp_path, '[kafka.client]\n"sasl.usernme" = "x"\n')
    for args in (["worker", "--role", "tool"], ["submit", "hi"]):
        result = CliRunner().invoke(app, [*args, "--bus", "kafka://127.0.0.1:1", "--kafka-config", str(bad)])
        assert result.exit_code == 2, result.output
        assert "did you mean 'sasl.username'?" in result.output and "Traceback" not in result.output


# -- every client kind gets them, against a real broker ---------------------------------------
def _sasl(tmp_path: Path, client_id: str) -> ks.KafkaSettings:
    write(tmp_path, "not-the-password\n", "pw")
    return ks.load(write(tmp_path, f"""
[kafka.client]
"security.protocol" = "SASL_PLAINTEXT"
"sasl.mechanism" = "SCRAM-SHA-256"
"sasl.username" = "loopstream"
"sasl.password_file" = "{tmp_path / 'pw'}"
"client.id" = "{client_id}"
"""), environ={})


def _wait_for(caplog: pytest.LogCaptureFixture, text: str, poll, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, f"no {text!r} in {[r.getMessage() for r in caplog.records]}"
        poll()


@pytest.mark.kafka
def test_every_client_kind_authenticates_with_the_settings(kafka_broker_auth: str, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Against a broker that requires SASL, each client kind made by the factory runs the SCRAM
    exchange the settings ask for (the broker answers `unknown-user`: Tansu 0.6 cannot have
    users), and the first request of a log says that the broker refused our credentials."""
    from loopstream.core.log import LogError
    from loopstream.kafka import clients
    from loopstream.kafka.clients import EVENTS, TopicPartition
    from loopstream.kafka.log import KafkaLog

    caplog.set_level(logging.DEBUG, logger="loopstream.kafka")
    s = _sasl(tmp_path, "ls-probe")
    with pytest.raises(LogError, match=r"refused our credentials .*SCRAM.*unknown-user"):
        KafkaLog(kafka_broker_auth, topic="t", settings=s, timeout=3)
    p = clients.producer(kafka_broker_auth, timeout=3, settings=s)  # it connects when made
    _wait_for(caplog, "kafka producer ls-probe: ", lambda: p.poll(0.1))
    for make in (lambda: clients.member(kafka_broker_auth, "g", EVENTS, settings=s),
                 lambda: clients.reader(kafka_broker_auth, "r", EVENTS, settings=s)):
        caplog.clear()
        c = make()
        c.assign([TopicPartition("t", 0, 0)])
        _wait_for(caplog, "kafka consumer ls-probe: ", lambda: c.poll(0.1))
        assert "SASL SCRAM authentication failed" in caplog.text
        c.close()
    clients.close(p)
    # Without the settings the same broker is not asked for SASL at all: no credentials refused.
    with pytest.raises(LogError, match="cannot reach the Kafka broker"):
        KafkaLog(kafka_broker_auth, topic="t", settings=ks.KafkaSettings(), timeout=1)


@pytest.mark.kafka
def test_a_refused_setting_stops_every_client_kind(kafka_broker: str) -> None:
    """A value librdkafka refuses, set for one client kind only, stops exactly that kind."""
    from loopstream.kafka import clients
    from loopstream.kafka.clients import EVENTS
    from loopstream.kafka.log import KafkaLog

    for kind in ("producer", "consumer", "admin"):
        s = ks.load(environ={f"LOOPSTREAM_KAFKA_{kind.upper()}_SECURITY_PROTOCOL": "bogus"})
        with pytest.raises(KafkaConfigError, match=rf"kafka {kind} client: Invalid value \"bogus\""):
            KafkaLog(kafka_broker, topic="t." + uuid.uuid4().hex[:8], settings=s, timeout=5)
        others = [k for k in ("producer", "consumer", "admin") if k != kind]
        made = {"producer": lambda: clients.producer(kafka_broker, settings=s),
                "consumer": lambda: clients.member(kafka_broker, "g", EVENTS, settings=s),
                "admin": lambda: clients.admin(kafka_broker, s)}
        for other in others:
            clients.close(made[other]())


# -- durable topics ---------------------------------------------------------------------------
@pytest.mark.kafka
def test_topics_are_created_with_explicit_configs_and_checked(kafka_broker: str, tmp_path: Path) -> None:
    from loopstream.core.log import LogError
    from loopstream.kafka import clients
    from loopstream.kafka.log import KafkaLog

    s = ks.load(write(tmp_path, "[kafka.topics]\npartitions = 2\nmin_insync_replicas = 1\n"
                                "goals_retention_ms = 3600000\n"), environ={})
    prefix = "d" + uuid.uuid4().hex[:8]
    with KafkaLog(kafka_broker, topic=f"{prefix}.events", settings=s, timeout=10) as log:
        assert log.partitions == 2
        events = clients.topic_configs(log.admin, f"{prefix}.events")
    assert {k: events.get(k) for k in ("retention.ms", "retention.bytes", "cleanup.policy", "min.insync.replicas")} \
        == {"retention.ms": "-1", "retention.bytes": "-1", "cleanup.policy": "delete", "min.insync.replicas": "1"}
    producer = clients.ContractProducer(kafka_broker, timeout=10, settings=s)
    try:
        producer.ensure_topic(f"{prefix}.goals", "goals")
        producer.ensure_topic(f"{prefix}.results")
        admin = clients.admin(kafka_broker, s)
        assert clients.topic_configs(admin, f"{prefix}.goals")["retention.ms"] == "3600000"
        assert clients.topic_configs(admin, f"{prefix}.results")["retention.ms"] == str(7 * ks.DAY_MS)
    finally:
        producer.close()
    # An existing topic: its own count is used unless a count is configured, then it must match.
    with KafkaLog(kafka_broker, topic=f"{prefix}.events", settings=ks.KafkaSettings(), timeout=10) as log:
        assert log.partitions == 2
    three = ks.load(write(tmp_path, "[kafka.topics]\npartitions = 3\n"), environ={})
    with pytest.raises(LogError, match=rf"topic {prefix}.events has 2 partitions but 3 are configured"):
        KafkaLog(kafka_broker, topic=f"{prefix}.events", settings=three, timeout=10)


@pytest.mark.kafka
def test_an_existing_events_topic_that_deletes_events_is_reported(kafka_broker: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from confluent_kafka.admin import NewTopic

    from loopstream.kafka import clients
    from loopstream.kafka.log import KafkaLog

    topic = "old." + uuid.uuid4().hex[:8]
    admin = clients.admin(kafka_broker)
    admin.create_topics([NewTopic(topic, 3, 1, config={"retention.ms": "604800000"})])[topic].result(10)
    caplog.set_level(logging.ERROR, logger="loopstream.kafka")
    with KafkaLog(kafka_broker, topic=topic, settings=ks.KafkaSettings(), timeout=10):
        pass
    assert f"topic {topic} will DELETE session events (retention.ms=604800000)" in caplog.text


# -- scaling options --------------------------------------------------------------------------
@pytest.mark.kafka
def test_subscriptions_share_and_hand_back_partitions_with_cooperative_sticky(kafka_broker: str) -> None:
    """partition.assignment.strategy=cooperative-sticky from the settings: two members of a
    group split the partitions, every accepted event is delivered to one of them and
    committed; when one leaves, the other gets its partitions and what comes next."""
    from loopstream.kafka.log import KafkaLog
    from tests.log_conformance import event, sid

    s = ks.load(environ={"LOOPSTREAM_KAFKA_CONSUMER_PARTITION_ASSIGNMENT_STRATEGY": "cooperative-sticky",
                         "LOOPSTREAM_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "2000",
                         "LOOPSTREAM_KAFKA_CONSUMER_HEARTBEAT_INTERVAL_MS": "500"})
    topic, group = "coop." + uuid.uuid4().hex[:8], "g-" + uuid.uuid4().hex[:8]
    with KafkaLog(kafka_broker, topic=topic, settings=s, timeout=10) as a, \
            KafkaLog(kafka_broker, topic=topic, settings=s, timeout=10) as b:
        one, two = a.subscribe(group), b.subscribe(group)
        deadline = time.monotonic() + 30
        while not (one._consumer.assignment() and two._consumer.assignment()):  # both members joined
            assert time.monotonic() < deadline
            one.poll(timeout=0.1)
            two.poll(timeout=0.1)
        first: list[str] = []
        while len(first) < 9:  # three sessions in each partition, so each member owns some
            session = sid()
            if sum(a.partition(x) == a.partition(session) for x in first) < 3:
                first.append(session)
        for session in first:
            a.append(session, [event(session, 0)], 0)
        got: dict[str, list[str]] = {"a": [], "b": []}
        deadline = time.monotonic() + 30
        while len(got["a"]) + len(got["b"]) < len(first) and time.monotonic() < deadline:
            for name, sub in (("a", one), ("b", two)):
                for d in sub.poll(max_events=100, timeout=0.2):
                    got[name].append(d.event.session_id)
                    sub.commit(d)
        assert sorted(got["a"] + got["b"]) == sorted(first)
        assert got["a"] and got["b"]  # both members had partitions
        two.close()
        later = [sid() for _ in range(6)]
        for session in later:
            b.append(session, [event(session, 0)], 0)
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while len(seen) < len(later) and time.monotonic() < deadline:
            seen += [d.event.session_id for d in one.poll(max_events=100, timeout=0.2)]
        assert sorted(seen) == sorted(later)


def test_static_membership_reaches_group_members_only(tmp_path: Path) -> None:
    """`loopstream worker --instance-id` (LOOPSTREAM_INSTANCE_ID): group.instance.id for the
    consumers that join a group, not for readers assigned by hand."""
    pytest.importorskip("confluent_kafka")
    from loopstream.cli.workers import kafka_settings
    from loopstream.kafka import clients

    s = kafka_settings("kafka://127.0.0.1:1", None, "model-1")
    assert s.properties("consumer")["group.instance.id"] == "model-1"
    assert "group.instance.id" not in s.properties("producer")
    member = clients.config("member", "b:1", s.properties("consumer"))
    assert member["group.instance.id"] == "model-1"
    assert kafka_settings("sqlite:///x.db", None, "model-1") is None
