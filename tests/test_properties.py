"""Property-based tests (hypothesis) of the fold and the codecs."""
from __future__ import annotations

import types
import typing

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopstream.core import events as ev
from loopstream.core.codec import CodecError, decode, encode
from loopstream.core.fsm import LEGAL, IllegalTransition, ask_machine
from loopstream.core.state import SessionState, apply, clone, fold
from tests.helpers import SAMPLE_PAYLOADS, assert_read_like_fastavro, make_event

SAMPLES = {p.TYPE: p for p in SAMPLE_PAYLOADS}
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)


def strategy_for(annotation: object) -> st.SearchStrategy:
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return st.none() | strategy_for(inner)
    if origin is list:
        return st.lists(strategy_for(typing.get_args(annotation)[0]), max_size=3)
    if isinstance(annotation, type) and issubclass(annotation, ev.BaseModel):
        return payload_strategy(annotation)
    floats = st.floats(allow_nan=False)  # Avro doubles round trip exactly; NaN is never equal to itself
    return {str: st.text(max_size=30), int: INT32, bool: st.booleans(), float: floats}[annotation]  # type: ignore[index]


def payload_strategy(cls: type) -> st.SearchStrategy:
    return st.builds(cls, **{name: strategy_for(f.annotation) for name, f in cls.model_fields.items()})


any_payload = st.one_of([payload_strategy(cls) for cls in ev.PAYLOAD_TYPES.values()])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=any_payload, seq=st.integers(min_value=0, max_value=2**40), chained=st.booleans())
def test_every_payload_round_trips_byte_for_byte(payload, seq, chained) -> None:
    event = make_event(payload, seq=seq, chain_hash=bytes(range(32)) if chained else None)
    data = encode(event)
    assert decode(data) == event
    assert encode(decode(data)) == data


@settings(max_examples=120, deadline=None)
@given(payload=st.sampled_from(SAMPLE_PAYLOADS), mask=st.integers(min_value=1, max_value=255), chained=st.booleans())
def test_corrupted_event_bytes_raise_codec_error_or_decode_as_fastavro_reads_them(payload, mask, chained) -> None:
    good = encode(make_event(payload, seq=5, chain_hash=bytes(range(32)) if chained else None))
    for at in range(len(good)):  # every byte of the event, flipped with the same mask
        bad = good[:at] + bytes([good[at] ^ mask]) + good[at + 1:]
        try:
            event = decode(bad)
        except CodecError:
            continue
        assert_read_like_fastavro(event, bad)  # a flip that still parses gives a well-formed event


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_fold_accepts_exactly_what_the_machine_allows_and_never_half_applies(data) -> None:
    state = SessionState()
    for _ in range(data.draw(st.integers(min_value=1, max_value=40))):
        # Half the time an event with a row in this state, so sessions get deep into the table.
        legal = sorted(t for s, t in LEGAL if s == state.status)
        t = data.draw(st.sampled_from(legal if legal and data.draw(st.booleans()) else sorted(ev.PAYLOAD_TYPES)))
        event = make_event(SAMPLES[t], seq=state.seq + 1)
        before = clone(state)
        try:
            expected = ask_machine(_after_payload(state, event), t)  # MACHINE itself, triggered
        except IllegalTransition:
            expected = None
        try:
            apply(state, event)
        except IllegalTransition:
            assert expected is None, (state.status, t)
            assert state == before  # rejected before anything changed
            continue
        assert state.status == expected


def _after_payload(state: SessionState, event: ev.Event) -> SessionState:
    """The state the machine's conditions see: the payload applied, the status not yet moved."""
    probe = clone(state)
    try:
        apply(probe, event, transition=lambda s, t, seq: s.status)
    except IllegalTransition:
        pass
    return probe


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(sorted(ev.PAYLOAD_TYPES)), min_size=2, max_size=40), st.data())
def test_folding_in_pieces_equals_folding_at_once(event_types, data) -> None:
    legal: list[ev.Event] = []
    state = SessionState()
    for t in event_types:
        event = make_event(SAMPLES[t], seq=state.seq + 1)
        try:
            apply(state, event)
        except IllegalTransition:
            continue
        legal.append(event)
    cut = data.draw(st.integers(min_value=0, max_value=len(legal)))
    assert fold(legal[cut:], fold(legal[:cut])) == fold(legal) == state
