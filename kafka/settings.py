"""The settings of a Kafka deployment that are not names: librdkafka properties for the
clients (security, tuning), topic configs (partitions, replication, retention) and group
options. Read from a TOML file (`--kafka-config PATH` or LOOPSTREAM_KAFKA_CONFIG; its
`[kafka.*]` tables) and from environment variables `LOOPSTREAM_KAFKA_<PROPERTY>`; a secret
comes from the environment or from a file (`sasl.password_file`), never from argv.
Imports no Kafka client (kafka/clients.py applies them). Reference: docs/kafka.md#settings.
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopstream.core.tomlfile import read_toml

CONFIG_ENV = "LOOPSTREAM_KAFKA_CONFIG"
ENV_PREFIX = "LOOPSTREAM_KAFKA_"
CLIENT_KINDS = ("client", "producer", "consumer", "admin")  # client: every client
MAX_FILE_BYTES = 1 << 20
MAX_SECRET_BYTES = 64 << 10
DAY_MS = 86_400_000

# Properties loopstream sets itself because its correctness depends on them: a user setting is refused.
PROTECTED = {
    "bootstrap.servers": "the --bus URL gives the brokers",
    "enable.idempotence": "producers are idempotent: the acceptance rule relies on one writer's order",
    "acks": "acks=all: a record counts once every in-sync replica has it",
    "transactional.id": "only the results relay produces in transactions",
    "enable.auto.commit": "offsets are committed by hand after handling (at-least-once)",
    "enable.auto.offset.store": "offsets are committed by hand after handling (at-least-once)",
    "auto.offset.reset": "a group without a committed offset owes everything (earliest)",
    "isolation.level": "set per topic (events read_uncommitted, goals and results read_committed)",
    "group.id": "groups are named from the bus prefix and the role",
    "enable.partition.eof": "the projection needs the end of each partition",
}
# Names for "did you mean" (librdkafka itself refuses any unknown name; kafka/clients.py `check`).
COMMON = (
    "security.protocol", "sasl.mechanism", "sasl.mechanisms", "sasl.username", "sasl.password",
    "sasl.kerberos.service.name", "sasl.kerberos.principal", "sasl.kerberos.keytab", "sasl.oauthbearer.method",
    "sasl.oauthbearer.client.id", "sasl.oauthbearer.client.secret", "sasl.oauthbearer.token.endpoint.url",
    "sasl.oauthbearer.scope", "ssl.ca.location", "ssl.certificate.location", "ssl.key.location",
    "ssl.key.password", "ssl.keystore.location", "ssl.keystore.password", "ssl.endpoint.identification.algorithm",
    "enable.ssl.certificate.verification", "ssl.ca.pem", "ssl.certificate.pem", "ssl.key.pem", "client.id",
    "client.rack", "session.timeout.ms", "heartbeat.interval.ms", "max.poll.interval.ms", "fetch.wait.max.ms",
    "fetch.min.bytes", "fetch.max.bytes", "linger.ms", "batch.size", "compression.type", "message.max.bytes",
    "message.timeout.ms", "request.timeout.ms", "socket.timeout.ms", "socket.keepalive.enable",
    "reconnect.backoff.ms", "reconnect.backoff.max.ms", "retry.backoff.ms", "metadata.max.age.ms",
    "topic.metadata.refresh.interval.ms", "partition.assignment.strategy", "group.instance.id",
    "group.protocol", "client.dns.lookup", "statistics.interval.ms", "debug", "log_level",
)
SECRET_WORDS = ("password", "secret", "jaas", "key.pem", "token")


class KafkaConfigError(ValueError):
    """Settings that cannot be used; the message is one line naming the place and the reason."""


@dataclass(frozen=True)
class TopicSettings:
    """How loopstream creates its topics, and what it checks of existing ones."""

    partitions: int = 3
    """Partitions of a topic loopstream creates; if set explicitly, an existing events topic
    with another count is an error."""
    partitions_set: bool = False
    replication_factor: int = -1
    """-1: the broker's default.replication.factor."""
    min_insync_replicas: int | None = None
    """None: the broker's default."""
    goals_retention_ms: int = 7 * DAY_MS
    results_retention_ms: int = 7 * DAY_MS

    def configs(self, kind: str) -> dict[str, str]:
        """The topic configs of a topic of `kind` (events | goals | results)."""
        if kind == "events":  # the only truth: never deleted, never compacted
            out = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}
        else:
            ms = self.goals_retention_ms if kind == "goals" else self.results_retention_ms
            out = {"cleanup.policy": "delete", "retention.ms": str(ms)}
        if self.min_insync_replicas is not None:
            out["min.insync.replicas"] = str(self.min_insync_replicas)
        return out


    def spec(self, kind: str, partitions: int | None = None) -> TopicSpec:
        """How to create (and check) a topic of `kind`; `partitions` given by the caller wins
        and is checked like a configured count."""
        return TopicSpec(partitions or self.partitions, self.replication_factor, self.configs(kind),
                         check_partitions=bool(partitions) or self.partitions_set, kind=kind)


@dataclass(frozen=True)
class TopicSpec:
    """One topic to create: partitions, replication factor (-1: the broker's default) and
    configs; `check_partitions`: an existing topic with another count is an error."""

    partitions: int = 3
    replication_factor: int = -1
    configs: Mapping[str, str] = field(default_factory=dict)
    check_partitions: bool = False
    kind: str = ""


REGISTRY_KEYS = ("url", "basic.auth.user.info", "ssl.ca.location", "ssl.certificate.location", "ssl.key.location")


@dataclass(frozen=True)
class RegistrySettings:
    """A Confluent Schema Registry for the goal contract (`[kafka.registry]`): goals framed
    with its wire format are read by their writer's schema, results are framed with it.
    `url` None: plain schemaless Avro (the default). `mock://NAME` is confluent-kafka's
    in-process registry (tests)."""

    url: str | None = None
    client: Mapping[str, str] = field(default_factory=dict)  # basic.auth.user.info, ssl.* for the HTTP client

    def __repr__(self) -> str:  # never print a secret
        return f"RegistrySettings(url={self.url!r}, keys={sorted(self.client)})"

    def conf(self) -> dict[str, str]:
        """The SchemaRegistryClient configuration."""
        return {"url": self.url or "", **self.client}


TOPIC_KEYS = {"partitions": int, "replication_factor": int, "min_insync_replicas": int,
              "goals_retention_ms": int, "results_retention_ms": int}


@dataclass(frozen=True)
class KafkaSettings:
    """librdkafka properties per client kind (`client` reaches every client), topic settings,
    and where they came from (for messages)."""

    client: Mapping[str, Any] = field(default_factory=dict)
    producer: Mapping[str, Any] = field(default_factory=dict)
    consumer: Mapping[str, Any] = field(default_factory=dict)
    admin: Mapping[str, Any] = field(default_factory=dict)
    topics: TopicSettings = TopicSettings()
    source: str = "defaults"
    registry: RegistrySettings = RegistrySettings()

    def __repr__(self) -> str:  # never print a secret
        tables = {k: {p: "***" if secret_looking(p) else v for p, v in getattr(self, k).items()} for k in CLIENT_KINDS}
        return f"KafkaSettings({tables}, {self.topics}, source={self.source!r})"

    def properties(self, kind: str) -> dict[str, Any]:
        """What a client of `kind` (producer | consumer | admin) gets: `client`, then its own."""
        return {**self.client, **getattr(self, kind)}

    def with_consumer(self, **props: Any) -> KafkaSettings:
        """A copy whose consumers also get `props` (e.g. group.instance.id from the CLI)."""
        return KafkaSettings(self.client, self.producer, {**self.consumer, **props}, self.admin, self.topics,
                             self.source, self.registry)

    def with_registry(self, url: str) -> KafkaSettings:
        """A copy using the Schema Registry at `url` (`--schema-registry`), keeping the file's keys."""
        if not url.startswith(("http://", "https://", "mock://")):
            raise KafkaConfigError(f"--schema-registry {url!r}: expected http://, https:// or mock:// URL")
        return KafkaSettings(self.client, self.producer, self.consumer, self.admin, self.topics, self.source,
                             RegistrySettings(url, self.registry.client))


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> KafkaSettings:
    """Settings from the file `path` (default: $LOOPSTREAM_KAFKA_CONFIG, none if unset), then
    `LOOPSTREAM_KAFKA_*` variables of `environ` over it. Raises KafkaConfigError."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_ENV) or None
    tables: dict[str, dict[str, Any]] = {k: {} for k in CLIENT_KINDS}
    topics: dict[str, Any] = {}
    registry = RegistrySettings()
    sources = []
    if path is not None:
        raw = _read_toml(Path(path))
        kafka = raw.get("kafka", {})
        where = str(path)
        if not isinstance(kafka, dict):
            raise KafkaConfigError(f"{where}: kafka: expected a table")
        for name, table in kafka.items():
            if name not in (*CLIENT_KINDS, "topics", "registry"):
                raise KafkaConfigError(f"{where}: kafka.{name}: unknown table"
                                       f"{_suggest(name, (*CLIENT_KINDS, 'topics', 'registry'))}")
            if not isinstance(table, dict):
                raise KafkaConfigError(f"{where}: kafka.{name}: expected a table")
            if name == "topics":
                topics = _topics(table, f"{where}: kafka.topics")
            elif name == "registry":
                registry = _registry(table, f"{where}: kafka.registry")
            else:
                for key, value in table.items():
                    _put(tables[name], key, value, f"{where}: kafka.{name}")
        sources.append(where)
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        rest, kind = name[len(ENV_PREFIX):], "client"
        for k in ("PRODUCER", "CONSUMER", "ADMIN"):
            if rest.startswith(k + "_"):
                rest, kind = rest[len(k) + 1:], k.lower()
        key = rest.lower().replace("_", ".")
        if key.endswith(".file"):
            key = key[: -len(".file")] + "_file"
        _put(tables[kind], key, environ[name], f"environment {name}")
        if "environment" not in sources:
            sources.append("environment")
    return KafkaSettings(tables["client"], tables["producer"], tables["consumer"], tables["admin"],
                         TopicSettings(**topics), " + ".join(sources) or "defaults", registry)


def _read_toml(path: Path) -> dict[str, Any]:
    return read_toml(path, f"--kafka-config {path}", MAX_FILE_BYTES, KafkaConfigError)


def _put(table: dict[str, Any], key: str, value: Any, where: str) -> None:
    """One librdkafka property; `NAME_file` reads NAME's value from a file (secrets)."""
    if not isinstance(key, str) or not key or not all(c.isalnum() or c in "._-" for c in key):
        raise KafkaConfigError(f"{where}: {key!r}: not a librdkafka property name")
    if isinstance(value, dict | list) or value is None:
        raise KafkaConfigError(f"{where}: {key}: expected a string, number or boolean")
    if key.endswith("_file"):
        key, value = key[: -len("_file")], _secret_file(str(value), f"{where}: {key}")
    if key in PROTECTED:
        raise KafkaConfigError(f"{where}: {key}: loopstream sets this itself ({PROTECTED[key]})")
    table[key] = value


def _secret_file(path: str, where: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise KafkaConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_SECRET_BYTES:
        raise KafkaConfigError(f"{where}: {path} is larger than {MAX_SECRET_BYTES} bytes")
    try:
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise KafkaConfigError(f"{where}: {path} is not UTF-8 text") from None


def _topics(table: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in TOPIC_KEYS:
            raise KafkaConfigError(f"{where}.{key}: unknown key{_suggest(key, TOPIC_KEYS)}")
        if not isinstance(value, int) or isinstance(value, bool):
            raise KafkaConfigError(f"{where}.{key}: expected an integer, got {value!r:.40}")
        low = -1 if key in ("replication_factor", "goals_retention_ms", "results_retention_ms") else 1
        if value < low or value == 0:
            raise KafkaConfigError(f"{where}.{key}: must be {'-1 or ' if low < 0 else ''}at least 1, got {value}")
        out[key] = value
    if "partitions" in out:
        out["partitions_set"] = True
    return out


def _registry(table: dict[str, Any], where: str) -> RegistrySettings:
    url, client = None, {}
    for key, value in table.items():
        name = key[: -len("_file")] if key.endswith("_file") else key
        if name not in REGISTRY_KEYS:
            raise KafkaConfigError(f"{where}.{key}: unknown key{_suggest(name, REGISTRY_KEYS)}")
        if not isinstance(value, str) or not value:
            raise KafkaConfigError(f"{where}.{key}: expected a non-empty string")
        if key.endswith("_file"):
            value = _secret_file(value, f"{where}.{key}")
        elif secret_looking(name) or name == "basic.auth.user.info":
            raise KafkaConfigError(f"{where}.{key}: a credential is read from a file: {key}_file = \"PATH\"")
        if name == "url":
            if not value.startswith(("http://", "https://", "mock://")):
                raise KafkaConfigError(f"{where}.url: expected an http://, https:// or mock:// URL")
            url = value
        else:
            client[name] = value
    if url is None:
        raise KafkaConfigError(f"{where}: needs url = \"http://HOST:8081\"")
    return RegistrySettings(url, client)


def _suggest(word: str, known: Any) -> str:
    close = difflib.get_close_matches(str(word), list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"


def suggest_property(name: str) -> str:
    """"; did you mean 'x'?" for a misspelt librdkafka property, or ""."""
    close = difflib.get_close_matches(name, COMMON, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def secret_looking(key: str) -> bool:
    """A property whose value is a credential (refused where it would show in `ps`)."""
    return any(w in key.lower() for w in SECRET_WORDS)
