"""Old sessions replay under new code: every stored fixture session (tests/fixtures/sessions,
the exact bytes the code of its day wrote) replays, verifies and folds under today's code,
and the same holds when a schema gains a version: Avro resolution reads the old bytes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loopstream.core import codec
from loopstream.core import events as ev
from loopstream.core.codec import CodecError, decode, load_registry
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.replay import (
    check_raw,
    fork,
    read_archive,
    render,
    replay_raw,
    verify_raw,
)
from loopstream.schemas import SCHEMA_DIR

FIXTURES = Path(__file__).parent / "fixtures" / "sessions"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
NAMES = sorted(MANIFEST)


def test_every_archive_is_in_the_manifest() -> None:
    assert sorted(p.stem for p in FIXTURES.glob("*.avro")) == NAMES
    assert any(MANIFEST[n]["chain"] == "unchained" for n in NAMES)  # a pre-chain session is kept


@pytest.mark.parametrize("name", NAMES)
def test_fixture_replays_under_the_newest_code(name: str) -> None:
    expected = MANIFEST[name]
    raw = read_archive(FIXTURES / f"{name}.avro")
    report = replay_raw(raw)
    assert report.ok, render(report)
    assert report.chain.status == expected["chain"]
    assert report.state.seq + 1 == expected["events"] == len(raw)
    assert report.state.status == expected["status"]
    assert report.state.answer == expected["answer"]
    for data in raw:  # every event decodes to the newest version of its type
        event = decode(data)
        assert event.schema_version == codec.REGISTRY.latest(event.type)
    render(report)


@pytest.mark.parametrize("name", [n for n in NAMES if MANIFEST[n]["determinism"] == "ok"])
def test_fixture_decisions_are_what_the_current_code_decides(name: str) -> None:
    report = check_raw(read_archive(FIXTURES / f"{name}.avro"), name)
    assert report.ok, report.render()


def test_the_pre_chain_session_decodes_and_shows_what_changed_since() -> None:
    raw = read_archive(FIXTURES / "legacy_5544f2a_prechain.avro")
    events = [decode(b) for b in raw]
    assert all(e.chain_hash is None for e in events)
    # The old envelope ends right after `payload`; today's writes one more (null) byte
    # (for an event whose type is still at the version it was written with: GoalReceived v1).
    assert events[1].type == "GoalReceived" and codec.REGISTRY.latest("GoalReceived") == 1
    assert codec.encode(events[1]) == raw[1] + b"\x00"
    # Its SessionStarted v1 reads as v2: no sampling recorded (a scripted model; the server decided).
    started = events[0].payload
    assert events[0].schema_version == codec.REGISTRY.latest("SessionStarted") >= 2
    assert (started.temperature, started.max_output_tokens, started.stop) == (None, None, [])
    # Its ModelFailed was written as v1 and reads as v2 through Avro resolution.
    failed = next(e for e in events if e.type == "ModelFailed")
    assert codec.REGISTRY.latest("ModelFailed") >= 2 and failed.payload.retry_after_ms is None
    # Written by code that retried at once; today's orchestrator schedules a backoff first.
    d = check_raw(raw, "legacy").divergence
    assert d is not None and d.seq == failed.seq + 1
    assert (d.expected[0], d.recorded[0]) == ("RetryScheduled", "ModelRequested")


def test_a_pre_chain_session_can_be_forked_and_the_child_is_chained(tmp_path) -> None:
    raw = read_archive(FIXTURES / "legacy_5544f2a_prechain.avro")
    with SQLiteLog(tmp_path / "l.db") as log:
        log.append("legacy5544f2a000", [decode(b) for b in raw], 0)  # re-encoded: stays unchained
        assert verify_raw(log.read_raw("legacy5544f2a000")).status == "unchained"
        child = fork(log, "legacy5544f2a000", 7, reason="old session, new code")
        assert verify_raw(log.read_raw(child.child_session_id)).status == "ok"


def _registry_with(tmp_path: Path, event_type: str, v2: dict) -> codec.SchemaRegistry:
    schemas = tmp_path / "schemas"
    shutil.copytree(SCHEMA_DIR, schemas, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    snake = "".join("_" + c.lower() if c.isupper() else c for c in event_type).lstrip("_")
    latest = codec.REGISTRY.latest(event_type)
    (schemas / f"{snake}.v{latest + 1}.avsc").write_text(json.dumps(v2))
    return load_registry(schemas)


def test_a_new_schema_version_still_reads_every_fixture(tmp_path, monkeypatch) -> None:
    """The mechanism a future v2 relies on: add goal_received.v2 with a defaulted field
    (and the model that mirrors it); old bytes resolve to it, the chain still verifies
    (it is over the stored bytes), and an upcaster can fill what Avro defaults cannot."""
    v1 = codec.REGISTRY.raw["GoalReceived"][1]
    v2 = {**v1, "fields": v1["fields"] + [{"name": "priority", "type": "int", "default": 0}]}
    registry = _registry_with(tmp_path, "GoalReceived", v2)

    class GoalReceivedV2(ev.GoalReceived):
        priority: int = 0

    monkeypatch.setattr(codec, "REGISTRY", registry)
    monkeypatch.setitem(ev.PAYLOAD_TYPES, "GoalReceived", GoalReceivedV2)
    for name in NAMES:
        raw = read_archive(FIXTURES / f"{name}.avro")
        report = replay_raw(raw)
        assert report.ok and report.state.status == MANIFEST[name]["status"], name
        goal = next(e for e in map(decode, raw) if e.type == "GoalReceived")
        assert isinstance(goal.payload, GoalReceivedV2)
        assert goal.schema_version == 2 and goal.payload.priority == 0

    # An upcaster for what resolution cannot express (here: derive the new field).
    registry.upcasters[("GoalReceived", 1)] = lambda f: {**f, "priority": len(f["text"])}
    raw = read_archive(FIXTURES / "adder_done.avro")
    goal = decode(raw[1])
    assert goal.payload.priority == len(goal.payload.text)
    # New events are written at v2 and read back at v2.
    fresh = goal.model_copy(update={"payload": GoalReceivedV2(text="hi", priority=7), "chain_hash": None})
    assert decode(codec.encode(fresh)).payload.priority == 7


def test_a_removed_type_is_a_clear_error_not_a_silent_skip(tmp_path, monkeypatch) -> None:
    schemas = tmp_path / "schemas"
    shutil.copytree(SCHEMA_DIR, schemas, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (schemas / "tool_completed.v1.avsc").unlink()
    monkeypatch.setattr(codec, "REGISTRY", load_registry(schemas))
    raw = read_archive(FIXTURES / "adder_done.avro")
    with pytest.raises(CodecError, match="ToolCompleted v1"):
        [decode(b) for b in raw]
    report = replay_raw(raw)  # the replay says where, and shows everything before it
    assert not report.ok and report.fold_error_seq == 5 and report.state.seq == 4
