"""The goal contract other systems speak (`Goal` in, `SessionUpdate` out, plain schemaless
Avro with the schemas of `schemas/contract/`; a goal in Confluent wire format is read too)
and the names of a Kafka deployment (`kafka://HOST:PORT?prefix=…&results=…` → topics and
groups). Imports no Kafka client. Details: docs/kafka.md."""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any
from urllib.parse import parse_qsl

import fastavro

from loopstream.core import events as ev
from loopstream.kafka import settings as ksettings
from loopstream.kafka.settings import KafkaSettings
from loopstream.schemas import SCHEMA_DIR

CONTRACT_DIR = SCHEMA_DIR / "contract"
DEFAULT_PREFIX = "loopstream"
CONFLUENT_MAGIC = 0
RESULTS_MODES = ("direct", "transactional")


class ContractError(ValueError):
    pass


class UnreadableGoal(ContractError):
    """A goal record that cannot be read as a Goal; `partial` is what could be read of it
    (the writer's own fields, to find its reply topic and correlation id), or None."""

    def __init__(self, message: str, partial: dict | None = None) -> None:
        super().__init__(message)
        self.partial = partial


@cache
def schema(name: str) -> Any:
    """Parsed schema `goal` or `session_update`."""
    return fastavro.parse_schema(json.loads((CONTRACT_DIR / f"{name}.avsc").read_text()))


@dataclass
class Goal:
    goal: str
    agent: str = "default"
    idempotency_key: str | None = None
    correlation_id: str | None = None
    reply_topic: str | None = None
    progress: bool = False
    submitted_ms: int = 0


@dataclass
class SessionUpdate:
    correlation_id: str
    session_id: str
    kind: str  # progress | result
    status: str
    seq: int
    event_type: str
    time: int
    answer: str | None = None
    error: str | None = None
    idempotency_key: str | None = None
    detail: str | None = None

    @property
    def dedupe_key(self) -> tuple[str, int]:
        return self.session_id, self.seq


def _write(name: str, record: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema(name), record)
    return buf.getvalue()


def _read(name: str, data: bytes) -> dict:
    buf = io.BytesIO(data)
    record = fastavro.schemaless_reader(buf, schema(name))
    if buf.tell() != len(data):
        raise ContractError(f"{len(data) - buf.tell()} trailing bytes after a {name} record")
    return record


def encode_goal(goal: Goal) -> bytes:
    if not goal.goal.strip():
        raise ContractError("a goal needs a non-empty goal text")
    return _write("goal", asdict(goal))


def decode_goal(data: bytes) -> Goal:
    """Plain Avro, or Confluent wire format (first byte 0) written with goal.avsc itself (the
    schema id is not looked up: kafka/registry.py does, with a registry); raises UnreadableGoal."""
    if not data:
        raise UnreadableGoal("empty goal record")
    body = data[5:] if data[0] == CONFLUENT_MAGIC and len(data) > 5 else data
    try:
        record = _read("goal", body)
    except ContractError as exc:
        raise UnreadableGoal(str(exc)) from None
    except Exception as exc:  # fastavro raises assorted errors for bytes that are not a Goal
        raise UnreadableGoal(f"not a Goal record: {type(exc).__name__}: {exc}") from None
    return check_goal(Goal(**record), record)


def check_goal(goal: Goal, record: dict) -> Goal:
    """`goal`, or UnreadableGoal (carrying `record`) if it cannot start a session."""
    if not goal.goal.strip():
        raise UnreadableGoal("the goal text is empty", record)
    return goal


def encode_update(update: SessionUpdate) -> bytes:
    return _write("session_update", asdict(update))


def decode_update(data: bytes) -> SessionUpdate:
    """Plain Avro, or registry-framed (magic byte 0 + schema id: loopstream never writes an
    update whose first field, a non-empty correlation id, starts with byte 0)."""
    body = data[5:] if data[:1] == bytes([CONFLUENT_MAGIC]) and len(data) > 5 else data
    try:
        return SessionUpdate(**_read("session_update", body))
    except ContractError:
        raise
    except Exception as exc:
        raise ContractError(f"not a SessionUpdate record: {type(exc).__name__}: {exc}") from None


def valid_topic(name: object) -> bool:
    """A legal Kafka topic name (1-249 of letters, digits, `.`, `_`, `-`)."""
    return isinstance(name, str) and 0 < len(name) < 250 and all(c.isascii() and (c.isalnum() or c in "._-")
                                                                  for c in name)


def session_id_for(idempotency_key: str) -> str:
    """The session a goal with this key starts (the rule of `Runtime.start_session`)."""
    return ev.derived_id("session", idempotency_key)[:16]


# -- names ---------------------------------------------------------------------------
@dataclass(frozen=True)
class KafkaBus:
    bootstrap: str
    prefix: str = DEFAULT_PREFIX
    consumer_config: dict[str, str] = field(default_factory=dict)
    results: str = "direct"  # direct | transactional: how the orchestrator role publishes results
    settings: KafkaSettings = field(default_factory=KafkaSettings)  # client properties, topic configs

    @property
    def events_topic(self) -> str:
        return f"{self.prefix}.events"

    @property
    def goals_topic(self) -> str:
        return f"{self.prefix}.goals"

    @property
    def results_topic(self) -> str:
        return f"{self.prefix}.results"

    @property
    def dead_letter_topic(self) -> str:
        """Goals that cannot be read, as they came, with the reason in header `ls.error`."""
        return f"{self.prefix}.goals.dlq"

    @property
    def projection_name(self) -> str:
        """File name of the local projection (one per events topic)."""
        return "kafka-projection.db" if self.prefix == DEFAULT_PREFIX else f"kafka-projection.{self.prefix}.db"

    def group(self, role: str, group_prefix: str | None = None) -> str:
        return f"{group_prefix or self.prefix}.{role}"


def parse_kafka_url(bus: str, settings: KafkaSettings | None = None) -> KafkaBus:
    """`kafka://HOST:PORT[,HOST:PORT][?prefix=NAME&results=MODE&key.with.dots=VALUE]` → KafkaBus,
    with `settings` (default: kafka/settings.py `load()`, the environment's). Credentials in
    the URL are refused: a command line shows in `ps`."""
    if not bus.startswith("kafka://"):
        raise ContractError(f"not a kafka bus: {bus!r}")
    rest = bus[len("kafka://"):]
    hosts, _, query = rest.partition("?")
    hosts = hosts.strip("/")
    if not hosts:
        raise ContractError("a kafka bus needs a broker address: kafka://HOST:PORT")
    if "@" in hosts:
        raise ContractError("no credentials in the kafka:// URL (a command line shows in `ps`): put sasl.username "
                            "and sasl.password in the --kafka-config file or LOOPSTREAM_KAFKA_SASL_* variables")
    prefix, consumer, results = DEFAULT_PREFIX, {}, "direct"
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if key == "prefix":
            if not value or not all(c.isalnum() or c in "._-" for c in value):
                raise ContractError(f"invalid topic prefix {value!r} (letters, digits, . _ -)")
            prefix = value
        elif key == "results":
            if value not in RESULTS_MODES:
                raise ContractError(f"invalid results mode {value!r}: one of {', '.join(RESULTS_MODES)}")
            results = value
        elif "." in key and ksettings.secret_looking(key):
            raise ContractError(f"no {key} in the kafka:// URL (a command line shows in `ps`): put it in the "
                                "--kafka-config file or a LOOPSTREAM_KAFKA_* variable (docs/kafka.md#settings)")
        elif "." in key:
            consumer[key] = value
        else:
            raise ContractError(f"unknown kafka bus option {key!r} (use prefix=, results=, or a librdkafka setting)")
    return KafkaBus(hosts, prefix, consumer, results, settings if settings is not None else ksettings.load())
