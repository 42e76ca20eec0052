"""The compiled Avro readers (core/avro_compiled.py) read exactly what fastavro reads, and
the compiled writers write exactly the bytes fastavro writes.

fastavro is the reference: every value here is written by fastavro's writer and read back
by both readers. The codec's fast path must also never be the one that decides an error.
"""
from __future__ import annotations

import io

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopstream.core import codec
from loopstream.core.avro_compiled import Unsupported, compile_reader, compile_writer
from loopstream.core.codec import CodecError, decode, encode
from tests.helpers import SAMPLE_PAYLOADS, make_event
from tests.test_properties import any_payload

EVERY_TYPE = {
    "type": "record", "name": "Everything", "namespace": "t",
    "fields": [
        {"name": "n", "type": "null"},
        {"name": "flag", "type": "boolean"},
        {"name": "i", "type": "int"},
        {"name": "l", "type": "long"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "s", "type": "string"},
        {"name": "b", "type": "bytes"},
        {"name": "fx", "type": {"type": "fixed", "name": "Four", "size": 4}},
        {"name": "e", "type": {"type": "enum", "name": "Color", "symbols": ["RED", "GREEN", "BLUE"]}},
        {"name": "a", "type": {"type": "array", "items": "long"}},
        {"name": "m", "type": {"type": "map", "values": ["null", "string"]}},
        {"name": "u", "type": ["null", "long", "string", {"type": "record", "name": "Inner", "fields": [
            {"name": "x", "type": "int"}, {"name": "fx2", "type": "Four"}]}]},
        {"name": "recs", "type": {"type": "array", "items": "Inner"}},
    ],
}
PARSED = parse_schema(EVERY_TYPE)
READ = compile_reader(EVERY_TYPE)
SAMPLES = {p.TYPE: p for p in SAMPLE_PAYLOADS}
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
inner = st.fixed_dictionaries({"x": INT32, "fx2": st.binary(min_size=4, max_size=4)})
everything = st.fixed_dictionaries({
    "n": st.none(), "flag": st.booleans(), "i": INT32, "l": INT64,
    "f": st.floats(width=32, allow_nan=False), "d": st.floats(allow_nan=False),
    "s": st.text(max_size=80), "b": st.binary(max_size=300), "fx": st.binary(min_size=4, max_size=4),
    "e": st.sampled_from(["RED", "GREEN", "BLUE"]), "a": st.lists(INT64, max_size=5),
    "m": st.dictionaries(st.text(max_size=5), st.none() | st.text(max_size=5), max_size=3),
    "u": st.none() | INT64 | st.text(max_size=10) | inner, "recs": st.lists(inner, max_size=3),
})


def written(record: dict) -> bytes:
    buf = io.BytesIO()
    schemaless_writer(buf, PARSED, record)
    return buf.getvalue()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(everything)
def test_every_avro_type_reads_as_fastavro_reads_it(record: dict) -> None:
    data = written(record)
    value, end = READ(data, 0)
    assert end == len(data)
    assert value == schemaless_reader(io.BytesIO(data), PARSED)


@pytest.mark.parametrize("n", [0, 1, -1, 63, -64, 64, 127, 128, 8191, 8192, 2**31 - 1, -(2**31), 2**62,
                               2**63 - 1, -(2**63), 1_795_623_992_524])
def test_varint_boundaries(n: int) -> None:
    schema = {"type": "record", "name": "L", "fields": [{"name": "v", "type": "long"}]}
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(schema), {"v": n})
    assert compile_reader(schema)(buf.getvalue(), 0) == ({"v": n}, len(buf.getvalue()))


def test_array_blocks_with_a_byte_size_are_read() -> None:
    """Writers may give a block's count as negative, followed by the block's size in bytes."""
    schema = {"type": "record", "name": "A", "fields": [{"name": "a", "type": {"type": "array", "items": "int"}}]}
    data = bytes([3, 4, 2, 4]) + bytes([2, 6, 0])  # block of -2 items (2 bytes): 1, 2; block of 1 item: 3; end
    assert compile_reader(schema)(data, 0) == ({"a": [1, 2, 3]}, len(data))
    assert schemaless_reader(io.BytesIO(data), parse_schema(schema)) == {"a": [1, 2, 3]}


STRING = {"type": "record", "name": "S", "fields": [{"name": "s", "type": "string"}]}
LONG_THEN_STRING = {"type": "record", "name": "LS", "fields": [{"name": "l", "type": "long"},
                                                               {"name": "s", "type": "string"}]}


@pytest.mark.parametrize("schema, data, why", [
    (STRING, bytes([1]), "negative length"),  # zigzag 1 = -1; read as a length of 0, it would end at the end
    (STRING, bytes([4, 0x61]), "truncated"),  # a 2-byte string with 1 byte left: the caller sees end > len
    # An 11-byte varint (the 10th byte still says "more"), then a 1-byte string: cut after 10
    # bytes, the rest would read as the string and end exactly at the end, silently wrong.
    (LONG_THEN_STRING, bytes([0xFF] * 9 + [0x81, 0x02, 0x61]), "varint longer than 10 bytes"),
    # A 10-byte varint whose last byte sets bits above 63: fastavro wraps it to 64 bits, so a
    # value read past them would differ from the codec of record.
    (LONG_THEN_STRING, bytes([0x80] * 9 + [0x02, 0x02, 0x61]), "varint beyond 64 bits"),
], ids=["negative length", "truncated", "varint longer than 10 bytes", "varint beyond 64 bits"])
def test_bad_bytes_are_an_error_or_end_past_the_data(schema: dict, data: bytes, why: str) -> None:
    read = compile_reader(schema)
    try:
        _, end = read(data, 0)
    except (ValueError, IndexError):
        return
    assert end > len(data), why


@pytest.mark.parametrize("byte", [0, 1, 2, 255])
def test_a_boolean_reads_like_fastavro_whatever_its_byte(byte: int) -> None:
    schema = {"type": "record", "name": "B", "fields": [{"name": "b", "type": "boolean"}]}
    data = bytes([byte])
    assert compile_reader(schema)(data, 0) == (schemaless_reader(io.BytesIO(data), parse_schema(schema)), 1)


def test_a_union_branch_out_of_range_is_an_error() -> None:
    read = compile_reader({"type": "record", "name": "U", "fields": [{"name": "u", "type": ["null", "int"]}]})
    with pytest.raises(ValueError, match="union branch"):
        read(bytes([4]), 0)  # branch 2 of 2


def test_unsupported_schemas_say_so() -> None:
    with pytest.raises(Unsupported):
        compile_reader({"type": "record", "name": "T", "fields": [
            {"name": "t", "type": {"type": "long", "logicalType": "timestamp-millis"}}]})
    with pytest.raises(Unsupported):
        compile_reader({"type": "array", "items": "int"})  # type: ignore[arg-type]
    with pytest.raises(Unsupported, match="recursive"):  # a linked list: fastavro reads those
        compile_reader({"type": "record", "name": "Node", "fields": [
            {"name": "value", "type": "int"}, {"name": "next", "type": ["null", "Node"]}]})


def test_every_event_type_has_a_compiled_reader_of_its_newest_version() -> None:
    reg = codec.REGISTRY
    assert set(reg.compiled_payloads) == {(t, reg.latest(t)) for t in reg.raw}
    assert reg.compiled_event is not None


def test_an_embedded_field_reads_in_place_with_the_reader_its_key_picks() -> None:
    inner = {"type": "record", "name": "In", "fields": [{"name": "x", "type": "int"}]}
    outer = {"type": "record", "name": "Out", "fields": [
        {"name": "kind", "type": "string"}, {"name": "body", "type": "bytes"}, {"name": "after", "type": "int"}]}
    body = io.BytesIO()
    schemaless_writer(body, parse_schema(inner), {"x": -7})
    data = io.BytesIO()
    schemaless_writer(data, parse_schema(outer), {"kind": "in", "body": body.getvalue(), "after": 5})
    read = compile_reader(outer, embedded={"body": (("kind",), {("in",): compile_reader(inner)})})
    assert read(data.getvalue(), 0) == ({"kind": "in", "body": {"x": -7}, "after": 5}, len(data.getvalue()))
    other = compile_reader(outer, embedded={"body": (("kind",), {})})
    with pytest.raises(KeyError):
        other(data.getvalue(), 0)
    with pytest.raises(Unsupported, match="later field"):
        compile_reader(outer, embedded={"body": (("after",), {})})


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(payload=any_payload, seq=st.integers(min_value=0, max_value=2**40), chained=st.booleans())
def test_the_fast_path_decodes_every_event_like_fastavro(payload, seq, chained, monkeypatch) -> None:
    event = make_event(payload, seq=seq, chain_hash=bytes(range(32)) if chained else None)
    data = encode(event)
    reference = codec._decode_fastavro(data)
    with monkeypatch.context() as m:  # the fast path alone: falling back would fail the test
        m.setattr(codec, "_decode_fastavro", lambda _: pytest.fail("fell back to fastavro"))
        fast = decode(data)
    assert fast == reference == event
    assert type(fast.payload) is type(reference.payload)
    assert fast.payload.model_dump() == reference.payload.model_dump()
    assert fast.model_fields_set == set(type(fast).model_fields)


@pytest.mark.parametrize("cut", [1, 20, 40, 100])
def test_truncated_events_are_reported_by_fastavro(cut: int) -> None:
    """The fast path never decides an error: fastavro's message names the problem."""
    data = encode(make_event(SAMPLES["ModelResponded"], seq=1, chain_hash=bytes(32)))
    with pytest.raises(CodecError, match="not a loopstream event envelope|corrupt payload"):
        decode(data[:-cut])


# -- the writers ----------------------------------------------------------------------------
OPTIONAL_ONLY = {**EVERY_TYPE, "fields": [f if f["name"] != "u" else {"name": "u", "type": ["null", f["type"][3]]}
                                         for f in EVERY_TYPE["fields"]]}  # u: null or the Inner record
OPTIONAL_PARSED = parse_schema(OPTIONAL_ONLY)
WRITE = compile_writer(OPTIONAL_ONLY)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(everything.map(lambda r: {**r, "u": r["u"] if isinstance(r["u"], dict) or r["u"] is None else None}))
def test_every_avro_type_is_written_as_fastavro_writes_it(record: dict) -> None:
    buf = io.BytesIO()
    schemaless_writer(buf, OPTIONAL_PARSED, record)
    out = bytearray()
    WRITE(record, out)
    assert bytes(out) == buf.getvalue()


@pytest.mark.parametrize("n", [0, 1, -1, 63, -64, 64, 127, 128, 8191, 8192, 2**31 - 1, -(2**31), 2**62,
                               2**63 - 1, -(2**63), 1_795_623_992_524])
def test_varints_are_written_as_fastavro_writes_them(n: int) -> None:
    schema = {"type": "record", "name": "L", "fields": [{"name": "v", "type": "long"}]}
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(schema), {"v": n})
    out = bytearray()
    compile_writer(schema)({"v": n}, out)
    assert bytes(out) == buf.getvalue()


def test_every_event_type_and_the_envelope_have_a_compiled_writer() -> None:
    assert set(codec.REGISTRY.compiled_writers) == set(codec.REGISTRY.versions)
    assert codec.REGISTRY.compiled_body is not None
    with pytest.raises(Unsupported, match="optional"):
        compile_writer(EVERY_TYPE)  # a wider union: which branch a value takes is fastavro's call


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(payload=any_payload, seq=st.integers(min_value=0, max_value=2**40), chained=st.booleans())
def test_the_fast_path_encodes_every_event_as_fastavro_does(payload, seq, chained, monkeypatch) -> None:
    event = make_event(payload, seq=seq, chain_hash=bytes(range(32)) if chained else None)
    fast = encode(event)
    with monkeypatch.context() as m:  # fastavro alone
        m.setattr(codec.REGISTRY, "compiled_writers", {})
        m.setattr(codec.REGISTRY, "compiled_body", None)
        assert encode(event) == fast
    assert decode(fast) == event


def test_a_value_the_compiled_writer_cannot_write_goes_to_fastavro() -> None:
    """A long beyond 64 bits: the compiled writer refuses it, fastavro decides what happens."""
    payload = SAMPLES["ToolCompleted"].model_copy(update={"latency_ms": 2**70})
    out = bytearray()
    with pytest.raises(ValueError):
        codec.REGISTRY.compiled_writers["ToolCompleted"](payload, out)
    try:
        reference = codec.encode_payload(payload)
    except Exception as exc:  # whatever fastavro does with it, the codec does the same
        with pytest.raises(type(exc)):
            fastavro_payload(payload)
    else:
        assert reference == fastavro_payload(payload)


def fastavro_payload(payload) -> bytes:
    buf = io.BytesIO()
    schemaless_writer(buf, codec.REGISTRY.versions[payload.TYPE][codec.REGISTRY.latest(payload.TYPE)],
                      payload.model_dump())
    return buf.getvalue()
