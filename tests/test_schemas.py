"""The .avsc files are the source of truth: the pydantic models must agree with them,
and every event type must survive an Avro round trip byte for byte."""
from __future__ import annotations

import json
import types
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loopstream.core import events as ev
from loopstream.core.codec import REGISTRY, CodecError, decode, encode, seal
from loopstream.schemas import SCHEMA_DIR
from tests.helpers import SAMPLE_PAYLOADS, assert_read_like_fastavro, make_event

AVRO_FOR = {str: "string", int: ("int", "long"), bool: "boolean", float: ("float", "double")}


def _avro_matches(annotation: object, avro: object) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return isinstance(avro, list) and avro[0] == "null" and len(args) == 1 and _avro_matches(args[0], avro[1])
    if origin is list:
        (inner,) = typing.get_args(annotation)
        return isinstance(avro, dict) and avro["type"] == "array" and _avro_matches(inner, avro["items"])
    if isinstance(annotation, type) and issubclass(annotation, ev.BaseModel):
        return isinstance(avro, dict) and avro["type"] == "record" and _record_matches(annotation, avro)
    expected = AVRO_FOR[annotation]  # type: ignore[index]
    return avro in expected if isinstance(expected, tuple) else avro == expected


def _record_matches(model: type[ev.BaseModel], schema: dict) -> bool:
    fields = {f["name"]: f for f in schema["fields"]}
    assert set(fields) == set(model.model_fields), f"{schema['name']}: {set(fields) ^ set(model.model_fields)}"
    for name, info in model.model_fields.items():
        assert _avro_matches(info.annotation, fields[name]["type"]), f"{schema['name']}.{name} type differs"
        if "default" in fields[name]:
            assert not info.is_required() and info.default == fields[name]["default"], f"{schema['name']}.{name} default"
        else:
            assert info.is_required(), f"{schema['name']}.{name} has a pydantic default but no Avro default"
    return True


@pytest.mark.parametrize("event_type", sorted(ev.PAYLOAD_TYPES))
def test_every_payload_model_agrees_with_its_newest_schema(event_type: str) -> None:
    raw = REGISTRY.raw[event_type][REGISTRY.latest(event_type)]
    assert raw["name"] == event_type
    assert _record_matches(ev.PAYLOAD_TYPES[event_type], raw)


def test_every_schema_file_has_a_model_and_the_envelope_matches_event() -> None:
    assert set(REGISTRY.raw) == set(ev.PAYLOAD_TYPES)
    envelope = json.loads((SCHEMA_DIR / "envelope.avsc").read_text())
    names = [f["name"] for f in envelope["fields"]]
    assert names == list(ev.Event.model_fields)


@pytest.mark.parametrize("payload", SAMPLE_PAYLOADS, ids=lambda p: p.TYPE)
def test_round_trip_every_event_type(payload: ev.Payload) -> None:
    event = make_event(payload, seq=3, causation_id="cause")
    data = encode(event)
    back = decode(data)
    assert back == event
    assert encode(back) == data


def test_sample_covers_every_event_type() -> None:
    assert {p.TYPE for p in SAMPLE_PAYLOADS} == set(ev.PAYLOAD_TYPES)


@settings(max_examples=200, deadline=None)
@given(text=st.text(), result=st.text(), n=st.integers(min_value=0, max_value=2**31 - 1))
def test_round_trip_arbitrary_text(text: str, result: str, n: int) -> None:
    for payload in (ev.GoalReceived(text=text), ev.ToolCompleted(call_id=text, name="t", result=result, latency_ms=n)):
        event = make_event(payload, seq=n)
        assert decode(encode(event)) == event


def _spliced(draw) -> bytes:
    """A real event's bytes with a run of them replaced by garbage (often still parses)."""
    data = encode(make_event(draw(st.sampled_from(SAMPLE_PAYLOADS)), seq=draw(st.integers(0, 2**40)),
                             chain_hash=draw(st.sampled_from([None, bytes(range(32))]))))
    start = draw(st.integers(0, len(data)))
    end = draw(st.integers(start, min(len(data), start + 8)))
    return data[:start] + draw(st.binary(max_size=8)) + data[end:]


garbage = st.binary(max_size=200) | st.composite(_spliced)()


@settings(max_examples=500, deadline=None)
@given(garbage)
def test_garbage_bytes_raise_codec_error_or_decode_as_fastavro_reads_them(data: bytes) -> None:
    try:
        event = decode(data)
    except CodecError:
        return  # the expected outcome; any other exception fails the test
    assert_read_like_fastavro(event, data)  # garbage that happens to parse is a well-formed event


def test_unknown_type_is_a_clear_error() -> None:
    good = encode(make_event(ev.GoalReceived(text="x"), event_id="e"))
    assert decode(good).type == "GoalReceived"
    data = good.replace(b"GoalReceived", b"GoalRecieved")  # same length: only the type differs
    with pytest.raises(CodecError, match="unknown type/version GoalRecieved v1"):
        decode(data)


def test_a_sealed_event_encodes_as_written_afresh_and_a_changed_copy_is_not_served_its_body() -> None:
    (sealed,) = seal([make_event(ev.GoalReceived(text="first"), seq=0)], None)
    changed = sealed.model_copy(update={"payload": ev.GoalReceived(text="other")})
    assert encode(changed) != encode(sealed.model_copy())  # a copy is another object: encoded afresh
    fresh = encode(sealed.model_copy())
    assert encode(sealed) == fresh  # the body seal kept
    assert encode(sealed) == fresh  # and again, once it is no longer kept
    assert decode(encode(changed)).payload.text == "other"
