"""Avro encoding of events with fastavro, driven by the `.avsc` files in `schemas/`.

Bytes of an event = schemaless Avro of the envelope; its `payload` field holds the
schemaless Avro of the payload at `schema_version`. Decoding resolves the writer's
version against the newest schema (Avro schema resolution), then applies any
registered upcaster, so old sessions decode under new code.

The envelope's last field, `chain_hash`, links each event to the one before it:
h_0 = sha256(b"loopstream-chain-v1" + body_0), h_n = sha256(h_(n-1) + body_n), where
body_n is the event's bytes before that field (everything but the last 33 bytes of
a chained event). `seal` sets it when events are built; loopstream.replay verifies it.
Events written before the field existed end right after `payload` and still decode.

fastavro writes every event. Reading has a fast path for replay: readers generated from
the same schemas (core/avro_compiled.py) take an event at the newest schema versions
straight to its pydantic objects; whatever they do not take whole (older versions,
events from before the chain, corrupt bytes) is read by fastavro, which also names
what is wrong. tests/test_avro_compiled.py proves the two agree.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from pydantic import BaseModel

from loopstream.core.avro_compiled import Reader, Unsupported, Writer, compile_reader, compile_writer
from loopstream.core.construct import construct, factory
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
    envelope_body: Any = None  # the envelope without its trailing chain_hash field
    versions: dict[str, dict[int, Any]] = field(default_factory=dict)  # type -> version -> parsed
    raw: dict[str, dict[int, dict]] = field(default_factory=dict)
    upcasters: dict[tuple[str, int], Upcaster] = field(default_factory=dict)
    # The fast path (core/avro_compiled.py): one reader from the bytes to the Event, payload
    # model included, for the newest version of every type whose schema has the model's
    # fields (`compiled_payloads`, by (type, version)). Anything else is read by fastavro.
    compiled_event: Reader | None = None
    compiled_payloads: dict[tuple[str, int], Reader] = field(default_factory=dict)
    # And writers (core/avro_compiled.py), for the newest version of each type whose schema
    # has the model's fields, and for the envelope body: the append's hot path.
    compiled_writers: dict[str, Writer] = field(default_factory=dict)  # type -> its newest version's
    compiled_body: Writer | None = None

    def latest(self, event_type: str) -> int:
        try:
            return max(self.versions[event_type])
        except KeyError:
            raise CodecError(f"unknown event type {event_type!r}") from None


def load_registry(schema_dir: Path = SCHEMA_DIR) -> SchemaRegistry:
    envelope_raw = json.loads((schema_dir / "envelope.avsc").read_text())
    envelope = parse_schema(envelope_raw)
    fields = envelope_raw["fields"]
    if fields[-1]["name"] == "chain_hash":
        fields = fields[:-1]
    body = parse_schema({**envelope_raw, "name": "EnvelopeBody", "fields": fields})
    reg = SchemaRegistry(envelope=envelope, envelope_body=body)
    for path in sorted(schema_dir.glob("*.avsc")):
        m = _FILE.match(path.name)
        if not m:
            continue
        raw = json.loads(path.read_text())
        name, version = raw["name"], int(m["version"])
        reg.raw.setdefault(name, {})[version] = raw
        reg.versions.setdefault(name, {})[version] = parse_schema(raw)
    _compile(reg, envelope_raw)
    return reg


def _models_in(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """`root` and every model its fields hold (in lists and optionals too), by record name."""
    found: dict[str, type[BaseModel]] = {}

    def visit(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if found.setdefault(annotation.__name__, annotation) is annotation:
                for f in annotation.model_fields.values():
                    visit(f.annotation)
        else:
            for arg in typing.get_args(annotation):
                visit(arg)

    visit(root)
    return found


def _compile(reg: SchemaRegistry, envelope_raw: dict) -> None:
    # The models the schemas' records decode to: the payloads and the records they hold.
    exact = {name: m for cls in PAYLOAD_TYPES.values() for name, m in _models_in(cls).items()}
    for name, by_version in reg.raw.items():
        latest = max(by_version)
        schema = by_version[latest]
        records = list(_records(schema))
        if not all(r["name"] in exact and {f["name"] for f in r["fields"]} == set(exact[r["name"]].model_fields)
                   for r in records):
            continue  # the models differ from this schema: fastavro and a checked construct
        try:
            reg.compiled_payloads[(name, latest)] = compile_reader(
                schema, factories={r["name"]: factory(exact[r["name"]]) for r in records})
        except Unsupported:
            pass
        try:
            reg.compiled_writers[name] = compile_writer(schema)
        except Unsupported:
            pass
    body_fields = [f for f in envelope_raw["fields"] if f["name"] != "chain_hash"]
    try:
        reg.compiled_body = compile_writer({**envelope_raw, "name": "EnvelopeBody", "fields": body_fields})
    except Unsupported:
        pass
    if {f["name"] for f in envelope_raw["fields"]} != set(Event.model_fields):
        return
    try:
        reg.compiled_event = compile_reader(
            envelope_raw, factories={envelope_raw["name"]: factory(Event)},
            embedded={"payload": (("type", "schema_version"), reg.compiled_payloads)})
    except Unsupported:
        pass


def _records(schema: Any) -> Iterator[dict]:
    """Every record schema defined in `schema`, itself included."""
    if isinstance(schema, list):
        for branch in schema:
            yield from _records(branch)
    elif isinstance(schema, dict):
        if schema.get("type") == "record":
            yield schema
            for f in schema["fields"]:
                yield from _records(f["type"])
        elif schema.get("type") == "array":
            yield from _records(schema["items"])
        elif schema.get("type") == "map":
            yield from _records(schema["values"])


REGISTRY = load_registry()


def register_upcaster(event_type: str, from_version: int, fn: Upcaster) -> None:
    """Register a transform for changes Avro resolution cannot express (renames, splits)."""
    REGISTRY.upcasters[(event_type, from_version)] = fn


def _session_started_v1(fields: dict[str, Any]) -> dict[str, Any]:
    """v1 recorded no sampling settings: fill in what the code of its day sent, where it
    fixed them (the local model: temperature 0, 1024 tokens; Anthropic: a 4096-token cap).
    The rest stays None: the server's defaults were used."""
    sent = {"local": (0.0, 1024), "anthropic": (None, 4096)}.get(fields["provider"])
    if sent is not None:
        fields["temperature"], fields["max_output_tokens"] = sent
    return fields


def _session_started_v2(fields: dict[str, Any]) -> dict[str, Any]:
    """v2 recorded no agent definition: it ran with what the command line gave (no project file)."""
    if not fields.get("agent_json"):
        fields["agent_json"] = json.dumps({"name": fields["agent"], "source": "flags"}, sort_keys=True)
    return fields


register_upcaster("SessionStarted", 1, _session_started_v1)
register_upcaster("SessionStarted", 2, _session_started_v2)


def encode_payload(payload: Payload) -> bytes:
    """The payload's Avro bytes in its type's newest schema: by the compiled writer where
    there is one, else (or if it cannot write this value) by fastavro."""
    write = REGISTRY.compiled_writers.get(payload.TYPE)
    if write is not None:
        out = bytearray()
        try:
            write(payload, out)
            return bytes(out)
        except Exception:  # fastavro writes it, or says what is wrong with it
            pass
    schema = REGISTRY.versions[payload.TYPE][REGISTRY.latest(payload.TYPE)]
    buf = io.BytesIO()
    schemaless_writer(buf, schema, payload.model_dump())
    return buf.getvalue()


CHAIN_GENESIS = b"loopstream-chain-v1"
_NO_HASH = b"\x00"  # union branch 0: null
_HASH = b"\x02"  # union branch 1: the 32-byte sha256 follows


def chain_link(prev: bytes | None, body: bytes) -> bytes:
    """h_n = sha256(h_(n-1) + body_n); the event at seq 0 links to the genesis tag."""
    return hashlib.sha256((CHAIN_GENESIS if prev is None else prev) + body).digest()


def seal(events: Sequence[Event], prev: bytes | None) -> list[Event]:
    """`events` with `chain_hash` set, each linked to the one before; `prev` is the chain
    hash of the event before the first (None only when the first is at seq 0)."""
    out = []
    for e in events:
        if prev is None and e.seq != 0:
            raise ValueError(f"seal: event at seq {e.seq} needs the chain hash of seq {e.seq - 1}")
        body = _encode_body(e)
        prev = chain_link(prev, body)
        sealed = construct(Event, {**e.__dict__, "chain_hash": prev})  # = model_copy(update=…), quicker
        _remember_body(sealed, body)
        out.append(sealed)
    return out


# The bodies `seal` just encoded, by the sealed event (kept alive here, so its id is not
# reused): appending a sealed event encodes it again, and this spares writing the body twice.
_SEALED_BODIES: dict[int, tuple[Event, bytes]] = {}


def _remember_body(event: Event, body: bytes) -> None:
    if len(_SEALED_BODIES) >= 256:
        _SEALED_BODIES.clear()
    _SEALED_BODIES[id(event)] = (event, body)


def encode(event: Event) -> bytes:
    known = _SEALED_BODIES.pop(id(event), None)
    body = known[1] if known is not None and known[0] is event else _encode_body(event)
    if event.chain_hash is None:
        return body + _NO_HASH
    if len(event.chain_hash) != 32:
        raise ValueError(f"chain_hash must be 32 bytes, got {len(event.chain_hash)}")
    return body + _HASH + event.chain_hash


def _encode_body(event: Event) -> bytes:
    """The envelope's bytes up to (not including) chain_hash: what the chain hashes."""
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
    if REGISTRY.compiled_body is not None:
        out = bytearray()
        try:
            REGISTRY.compiled_body(record, out)
            return bytes(out)
        except Exception:  # fastavro writes it, or says what is wrong with it
            pass
    buf = io.BytesIO()
    schemaless_writer(buf, REGISTRY.envelope_body, record)
    return buf.getvalue()


class _NotCompiled(Exception):
    """The compiled fast path does not read these bytes; fastavro does."""


def decode(data: bytes) -> Event:
    """One stored event (see `decode_prefix`); CodecError if it cannot be read."""
    events, error = decode_prefix((data,))
    if error is not None:
        raise error
    return events[0]


def _decode_fastavro(data: bytes) -> Event:
    buf = io.BytesIO(data)
    try:
        env = schemaless_reader(buf, REGISTRY.envelope_body)
    except Exception as exc:  # fastavro raises many types on garbage input
        raise CodecError(f"not a loopstream event envelope: {exc}") from exc
    rest = len(data) - buf.tell()
    if rest == 33 and data[-33] == 2:
        env["chain_hash"] = data[-32:]
    elif rest == 0 or (rest == 1 and data[-1] == 0):  # rest == 0: written before chain_hash existed
        env["chain_hash"] = None
    else:
        raise CodecError(f"not a loopstream event envelope: {rest} unexpected bytes after the payload")
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
        env["payload"] = _payload(cls, fields)
    except Exception as exc:
        raise CodecError(
            f"corrupt payload at seq {env['seq']} of session {env['session_id']}: {exc}"
        ) from exc
    env["schema_version"] = latest
    return construct(Event, env)


def decode_prefix(raw: Sequence[bytes]) -> tuple[list[Event], CodecError | None]:
    """Decode stored events in order up to the first that does not decode: the events
    before it, and its error (None when all decode).

    The compiled reader takes the common case (the newest schema versions, well-formed
    bytes); everything else, corrupt bytes included, goes through fastavro, which
    resolves old versions and names what is wrong. The replay's hot loop."""
    read = REGISTRY.compiled_event
    out: list[Event] = []
    append = out.append
    for data in raw:
        try:
            event, end = read(data, 0)  # type: ignore[misc]  # None: TypeError, fastavro
            if end != len(data):
                raise _NotCompiled
        except Exception:
            try:
                event = _decode_fastavro(data)
            except CodecError as exc:
                return out, exc
        append(event)
    return out, None


def decode_session(raw: Sequence[bytes], session_id: str, from_seq: int = 0) -> list[Event]:
    """Decode a session's stored events in order; an unreadable one is named by its seq."""
    out, exc = decode_prefix(raw)
    if exc is None:
        return out
    seq = from_seq + len(out)
    if f"seq {seq} " in str(exc):
        raise exc
    raise CodecError(f"session {session_id}, seq {seq}: {exc}") from exc


def _payload(cls: type[Payload], fields: dict[str, Any]) -> Payload:
    # Trusted input (our own schema just decoded it): skip validation, unless the payload
    # holds records (ModelResponded's tool calls): validation builds their models.
    return cls.model_validate(fields) if cls in _NESTED else construct(cls, fields)


_NESTED = frozenset(cls for cls in PAYLOAD_TYPES.values() if len(_models_in(cls)) > 1)
