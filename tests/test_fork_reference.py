"""Forks by reference on the SQLite log: a child reads its parent's prefix instead of a copy.

Every reader of the child (read, read_raw, replay, export, diff, spans, determinism) sees its
whole history; its chain runs across the reference; deleting the parent materialises the
prefix into the child first, and SQLite itself refuses to delete an event a child refers to."""
from __future__ import annotations

import sqlite3

import pytest

from loopstream.core import events as ev
from loopstream.core.log import ConcurrencyError, DuplicateEvent, LogError, SessionNotFound
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from loopstream.observe.spans import session_spans
from loopstream.providers.scripted import ScriptedProvider, adder_script
from loopstream.replay import check_determinism, fork, verify
from loopstream.replay.archive import export_session, read_archive
from loopstream.replay.diff import diff
from loopstream.replay.diff import render as render_diff
from loopstream.replay.replayer import replay
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig
from tests.log_conformance import events as goal_events


def run(log, steps: int, tmp_path) -> str:
    rt = build_runtime(log, ScriptedProvider(adder_script(steps)))
    config = SessionConfig(provider="scripted", model="scripted:adder", tools=["add"], max_steps=steps + 3,
                           workdir=str(tmp_path))
    sid = rt.start_session("count", config)
    rt.run_session(sid)
    return sid


def own_rows(log: SQLiteLog, sid: str) -> int:
    return log.db.conn.execute("SELECT count(*) FROM events WHERE session_id = ?", (sid,)).fetchone()[0]


@pytest.fixture
def log(tmp_path):
    with SQLiteLog(tmp_path / "f.db") as log:
        yield log


def test_a_fork_of_a_fork_reads_through_both_references_and_every_reader_sees_it(log, tmp_path) -> None:
    parent = run(log, 6, tmp_path)
    a = fork(log, parent, 13, model="m2").child_session_id
    build_runtime(log, ScriptedProvider(adder_script(8))).run_session(a)
    b = fork(log, a, 9, reason="inside a's inherited prefix").child_session_id  # refers to a, which refers on
    c = fork(log, a, 25, reason="after a's own start").child_session_id
    for child, at, source in ((a, 13, parent), (b, 9, parent), (c, 25, a)):
        raw = log.read_raw(child)
        assert own_rows(log, child) == len(raw) - at - 1  # its own events only: the prefix is referred to
        assert raw[: at + 1] == log.read_raw(source, 0, at) and len(raw) == log.next_seq(child)
        assert log.read_raw(child, at - 2, at + 1) == raw[at - 2: at + 2]  # a range across the reference
        assert verify(log, child).ok and check_determinism(log, child).ok
        report = replay(log, child)
        assert report.state == fold(log.read(child)) and report.state.session_id == child
        assert report.forked_from.parent_session_id in (parent, a)
        assert export_session(log, child, tmp_path / f"{child}.avro") == len(raw)
        assert read_archive(tmp_path / f"{child}.avro") == raw
        spans = session_spans(log.read(child))
        assert {s.attributes.get("loopstream.session.id") for s in spans if s.parent_id is None} == {child}
    assert "b is a fork of a at seq 25" in render_diff(diff(log, a, c))
    build_runtime(log, ScriptedProvider(adder_script(8))).run_session(c)
    assert check_determinism(log, c).ok and verify(log, c).ok


def test_deleting_a_parent_materialises_its_children_first(log, tmp_path) -> None:
    parent = run(log, 4, tmp_path)
    child = fork(log, parent, 9).child_session_id
    grandchild = fork(log, child, 10).child_session_id
    before = {s: log.read_raw(s) for s in (child, grandchild)}
    with pytest.raises(sqlite3.IntegrityError, match="refers to this event"):  # not even by hand
        log.db.conn.execute("DELETE FROM events WHERE session_id = ? AND seq = 3", (parent,))
    assert log.delete_session(child) == 1  # the middle of the chain: the grandchild keeps its history
    assert log.parent_of(grandchild) == (None, 10) and log.read_raw(grandchild) == before[grandchild]
    assert log.delete_session(parent) > 9
    assert log.next_seq(parent) == 0 and log.read_raw(parent) == []
    assert log.read_raw(grandchild) == before[grandchild] and verify(log, grandchild).ok
    assert check_determinism(log, grandchild).ok
    build_runtime(log, ScriptedProvider(adder_script(6))).run_session(grandchild)
    assert verify(log, grandchild).ok and log.read(grandchild)[-1].type == "SessionFinished"


def test_append_linked_keeps_the_log_contract(log) -> None:
    log.append("p", goal_events("p", 0, 5), 0)
    first = goal_events("c", 3, 2)
    with pytest.raises(SessionNotFound):
        log.append_linked("c", "nobody", 2, first)
    with pytest.raises(LogError, match="0..4"):
        log.append_linked("c", "p", 7, goal_events("c", 8, 1))
    log.append_linked("c", "p", 2, first)
    assert [e.event_id for e in log.read("c")] == [e.event_id for e in log.read("p", 0, 2)] + [e.event_id
                                                                                               for e in first]
    with pytest.raises(DuplicateEvent):  # the same fork again
        log.append_linked("c", "p", 2, first)
    with pytest.raises(ConcurrencyError):  # another fork with the same child id
        log.append_linked("c", "p", 1, goal_events("c", 2, 1))
    log.append("c", goal_events("c", 5, 1), 5)  # the child goes on like any session
    assert log.next_seq("c") == 6 and {i.session_id: i.next_seq for i in log.sessions()} == {"p": 5, "c": 6}
    with SQLiteLog(log.path, readonly=True) as ro:
        assert ro.read_raw("c") == log.read_raw("c")


def test_a_log_file_from_before_links_opens_read_only_and_writable(tmp_path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE events (gpos INTEGER PRIMARY KEY, session_id TEXT, seq INTEGER, event_id TEXT, type TEXT, "
        "time_ms INTEGER, data BLOB); CREATE TABLE sessions (session_id TEXT PRIMARY KEY, created_ms INTEGER, "
        "updated_ms INTEGER, next_seq INTEGER, last_type TEXT);")
    conn.close()
    with SQLiteLog(path, readonly=True) as ro:
        assert ro.read_raw("x") == [] and ro.parent_of("x") is None
    with SQLiteLog(path) as rw:
        rw.append("p", goal_events("p", 0, 2), 0)
        rw.append_linked("c", "p", 0, goal_events("c", 1, 1))
        assert len(rw.read("c")) == 2


def test_a_fork_on_a_log_without_references_still_copies(log, tmp_path) -> None:
    """The Kafka log has no `append_linked`: the fork copies the prefix there (as before)."""

    class Plain:  # the Log protocol only, over the same file
        def __init__(self, inner: SQLiteLog) -> None:
            self.inner = inner

        def __getattr__(self, name: str):
            if name in ("append_linked", "read_raw_of_types"):
                raise AttributeError(name)
            return getattr(self.inner, name)

    parent = run(log, 3, tmp_path)
    result = fork(Plain(log), parent, 9)
    assert result.events_copied == 10 and result.events_referred == 0
    assert own_rows(log, result.child_session_id) == 11
    assert {e.session_id for e in log.read(result.child_session_id)} == {result.child_session_id}
    assert verify(log, result.child_session_id).ok
    assert isinstance(log.read(result.child_session_id)[10].payload, ev.SessionForked)
