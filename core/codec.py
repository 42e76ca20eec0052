"""Avro encoding of events with fastavro, driven by the `.avsc` files in `schemas/`.

Bytes of an event = schemaless Avro of the envelope; its `payload` field holds the
schemaless Avro of the payload at `schema_version`. Decoding resolves the writer's
version against the newest schema (Avro schema resolution), then applies any
registered upcaster, so old sessions decode under new code.
"""
from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer

from loopstream.core.events import PAYLOAD_TYPES, Event, Payload
from loopstream.schemas import SCHEMA_DIR

_FILE = re.compile(r"^(?P<name>[a-z_]+)\.v(?P<version>\d+)\.avsc$")


class CodecError(ValueError):
    """Bytes that are not a loopstream event we can read (corrupt, or an unknown type/version)."""


Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class SchemaRegistry:
    """Every payload schema version found on disk, plus the envelope schema."""

    envelope: Any
    versions: dict[str, dict[int, Any]] = field(default_factory=dict)  # type -> version -> parsed
    raw: dict[str, dict[int, dict]] = field(default_factory=dict)
    upcasters: dict[tuple[str, int], Upcaster] = field(default_factory=dict)

    def latest(self, event_type: str) -> int:
        try:
            return max(self.versions[event_type])
        except KeyError:
            raise CodecError(f"unknown event type {event_type!r}") from None


def load_registry(schema_dir: Path = SCHEMA_DIR) -> SchemaRegistry:
    envelope = parse_schema(json.loads((schema_dir / "envelope.avsc").read_text()))
    reg = SchemaRegistry(envelope=envelope)
    for path in sorted(schema_dir.glob("*.avsc")):
        m = _FILE.match(path.name)
        if not m:
            continue
        raw = json.loads(path.read_text())
        name, version = raw["name"], int(m["version"])
        reg.raw.setdefault(name, {})[version] = raw
        reg.versions.setdefault(name, {})[version] = parse_schema(raw)
    return reg


REGISTRY = load_registry()


def register_upcaster(event_type: str, from_version: int, fn: Upcaster) -> None:
    """Register a transform for changes Avro resolution cannot express (renames, splits)."""
    REGISTRY.upcasters[(event_type, from_version)] = fn


def encode_payload(payload: Payload) -> bytes:
    schema = REGISTRY.versions[payload.TYPE][REGISTRY.latest(payload.TYPE)]
    buf = io.BytesIO()
    schemaless_writer(buf, schema, payload.model_dump())
    return buf.getvalue()


def encode(event: Event) -> bytes:
    record = {
        "event_id": event.event_id,
        "session_id": event.session_id,
        "seq": event.seq,
        "type": event.type,
        "time": event.time,
        "causation_id": event.causation_id,
        "correlation_id": event.correlation_id,
        "actor": event.actor,
        "schema_version": event.schema_version,
        "payload": encode_payload(event.payload),
    }
    buf = io.BytesIO()
    schemaless_writer(buf, REGISTRY.envelope, record)
    return buf.getvalue()


def decode(data: bytes) -> Event:
    try:
        env = schemaless_reader(io.BytesIO(data), REGISTRY.envelope)
    except Exception as exc:  # fastavro raises many types on garbage input
        raise CodecError(f"not a loopstream event envelope: {exc}") from exc
    event_type, version = env["type"], env["schema_version"]
    cls = PAYLOAD_TYPES.get(event_type)
    writer = REGISTRY.versions.get(event_type, {}).get(version)
    if cls is None or writer is None:
        raise CodecError(
            f"event seq {env['seq']} of session {env['session_id']} has unknown type/version "
            f"{event_type} v{version}"
        )
    latest = REGISTRY.latest(event_type)
    try:
        if version == latest:
            fields = schemaless_reader(io.BytesIO(env["payload"]), writer)
        else:
            reader = REGISTRY.versions[event_type][latest]
            fields = schemaless_reader(io.BytesIO(env["payload"]), writer, reader)
            for v in range(version, latest):
                up = REGISTRY.upcasters.get((event_type, v))
                if up:
                    fields = up(fields)
    except Exception as exc:
        raise CodecError(
            f"corrupt payload at seq {env['seq']} of session {env['session_id']}: {exc}"
        ) from exc
    env["payload"] = _payload(cls, fields)
    env["schema_version"] = latest
    return Event.model_construct(**env)


def _payload(cls: type[Payload], fields: dict[str, Any]) -> Payload:
    # Trusted input (our own schema just decoded it): skip validation, but nested
    # records still need their model type.
    if cls.TYPE == "ModelResponded":
        from loopstream.core.events import ToolCallRecord

        fields["tool_calls"] = [ToolCallRecord.model_construct(**c) for c in fields["tool_calls"]]
    return cls.model_construct(**fields)
