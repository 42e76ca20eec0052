"""The goal contract over a Confluent Schema Registry (`[kafka.registry]` or
`--schema-registry`): goals in the registry wire format (magic byte 0, 4-byte big-endian
schema id, the record) are read with the writer's schema, looked up by id, resolved to
ours by Avro's rules, so a compatible evolved goal schema is read; results are framed
with our registered session_update schema. Besides kafka/clients.py, the only module that
imports confluent-kafka (its schema-registry client is an HTTP client, not a Kafka one).
The wire format: docs/kafka.md#the-goal-contract."""
from __future__ import annotations

import io
import json
import threading
from dataclasses import asdict
from typing import Any

import fastavro

from loopstream.kafka.contract import (
    CONTRACT_DIR,
    ContractError,
    Goal,
    SessionUpdate,
    UnreadableGoal,
    check_goal,
    decode_goal,
    schema,
)
from loopstream.kafka.settings import RegistrySettings

try:  # the [kafka-registry] extra
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext
except ImportError:  # pragma: no cover - exercised only without the extra
    SchemaRegistryClient = None  # type: ignore[assignment,misc]

MAGIC = 0
_MOCKS: dict[str, Any] = {}  # mock:// URL -> its client: one in-process registry per name
_MOCKS_LOCK = threading.Lock()


def client_for(settings: RegistrySettings) -> Any:
    """The registry client of `settings`. Every `mock://NAME` client of this process is the
    same object, so a test and the workers it runs in threads see the same schemas."""
    if SchemaRegistryClient is None:
        raise ContractError("a schema registry needs the [kafka-registry] extra: "
                            "pip install 'loopstream[kafka-registry]'")
    url = settings.url or ""
    if not url.startswith("mock://"):
        return SchemaRegistryClient.new_client(settings.conf())
    with _MOCKS_LOCK:
        if url not in _MOCKS:
            _MOCKS[url] = SchemaRegistryClient.new_client(settings.conf())
        return _MOCKS[url]


def subject(topic: str) -> str:
    """The registry subject of a topic's values (TopicNameStrategy, the serializers' default)."""
    return f"{topic}-value"


class RegistryContract:
    """Reads goals and writes updates with a Schema Registry. Registers goal.avsc under
    `<goals topic>-value` and session_update.avsc under `<results topic>-value` at start;
    an update to another reply topic registers it under that topic's subject."""

    def __init__(self, settings: RegistrySettings, goals_topic: str, results_topic: str) -> None:
        self.client = client_for(settings)
        goal_text = (CONTRACT_DIR / "goal.avsc").read_text()
        self._update_text = (CONTRACT_DIR / "session_update.avsc").read_text()
        try:
            self.goal_id = self.client.register_schema(subject(goals_topic), Schema(goal_text, "AVRO"))
            self.update_id = self.client.register_schema(subject(results_topic), Schema(self._update_text, "AVRO"))
        except Exception as exc:  # the registry refused or is unreachable: one line at start
            raise ContractError(f"schema registry {settings.url}: cannot register the contract schemas: "
                                f"{type(exc).__name__}: {exc}") from None
        self._serializer = AvroSerializer(self.client, self._update_text, lambda u, _ctx: asdict(u),
                                          conf={"auto.register.schemas": True})
        self._writers: dict[int, Any] = {}
        self._lock = threading.Lock()

    def _writer_schema(self, schema_id: int) -> Any:
        with self._lock:
            found = self._writers.get(schema_id)
        if found is not None:
            return found
        try:
            registered = self.client.get_schema(schema_id)
        except Exception as exc:
            raise UnreadableGoal(f"schema id {schema_id} is not in the registry: {exc}") from None
        if (registered.schema_type or "AVRO") != "AVRO":
            raise UnreadableGoal(f"schema id {schema_id} is a {registered.schema_type} schema, not Avro")
        try:
            parsed = fastavro.parse_schema(json.loads(registered.schema_str))
        except Exception as exc:
            raise UnreadableGoal(f"schema id {schema_id} is not a valid Avro schema: {exc}") from None
        with self._lock:
            self._writers[schema_id] = parsed
        return parsed

    def decode_goal(self, data: bytes) -> Goal:
        """A framed goal read by its writer's schema and resolved to goal.avsc; a plain one as
        without a registry. UnreadableGoal (with what could be read, for the reply) otherwise."""
        if not data or data[0] != MAGIC:
            return decode_goal(data)
        if len(data) < 5:
            raise UnreadableGoal("a framed goal shorter than its 5-byte header")
        writer = self._writer_schema(int.from_bytes(data[1:5], "big"))
        buf = io.BytesIO(data[5:])
        try:
            record = fastavro.schemaless_reader(buf, writer, schema("goal"))
        except Exception as exc:  # not resolvable to goal.avsc (Avro schema resolution)
            raise UnreadableGoal(f"the writer's schema (id {int.from_bytes(data[1:5], 'big')}) cannot be read as "
                                 f"a Goal: {type(exc).__name__}: {exc}", _partial(data[5:], writer)) from None
        if buf.tell() != len(data) - 5:
            raise UnreadableGoal(f"{len(data) - 5 - buf.tell()} trailing bytes after a Goal record")
        return check_goal(Goal(**record), record)

    def encode_update(self, topic: str, update: SessionUpdate) -> bytes:
        return self._serializer(update, SerializationContext(topic, MessageField.VALUE))


def _partial(body: bytes, writer: Any) -> dict | None:
    """The record as its writer wrote it (to find where to say it was rejected), or None."""
    try:
        record = fastavro.schemaless_reader(io.BytesIO(body), writer)
    except Exception:
        return None
    return record if isinstance(record, dict) else None
