"""Snapshots of the folded state (runtime/snapshots.py): always the full fold's state, at any
seq, for hostile text, compaction and forks; ignored when stale, forged or damaged."""
from __future__ import annotations

import os
import pickle

import pytest

from loopstream.core.conversation import Message, MessageList, ToolCall
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from loopstream.providers.base import ModelReply
from loopstream.providers.scripted import ScriptedProvider
from loopstream.replay import fork
from loopstream.runtime import snapshots
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig
from loopstream.runtime.snapshots import Snapshots
from loopstream.runtime.writer import SessionWriter
from loopstream.tools.registry import ToolRegistry, tool

HOSTILE = ["<script>alert(1)</script>", "\ud800 lone", "nul\x00byte", "é" * 300, "]]>{{x}}\n" * 50]


@tool
def echo(n: int) -> str:
    """Hostile text back."""
    return f"{n}:" + HOSTILE[n % len(HOSTILE)]


def script(steps: int):
    def reply(messages: list[Message]) -> ModelReply:
        done = sum(1 for m in messages if m.role == "tool")
        if done < steps:
            return ModelReply(text=HOSTILE[done % len(HOSTILE)], input_tokens=3, output_tokens=2, mode="native",
                              tool_calls=[ToolCall(call_id=f"c{done}", name="echo", arguments={"n": done})])
        return ModelReply(text="done \udfff", input_tokens=3, output_tokens=2)
    return reply


@pytest.fixture
def small_stride(monkeypatch):
    monkeypatch.setattr(snapshots, "STRIDE", 8)


def run(log, steps: int, tmp_path) -> str:
    rt = build_runtime(log, ScriptedProvider(script(steps)), ToolRegistry().add(echo))
    config = SessionConfig(provider="scripted", model="s", tools=["echo"], max_steps=steps + 3,
                           workdir=str(tmp_path), system_prompt="be \ud83d brief")
    sid = rt.start_session("hostile <b>goal</b>", config)
    rt.run_session(sid)
    return sid


def rows(log: SQLiteLog, sid: str) -> list[tuple]:
    return log.db.conn.execute("SELECT seq, base_seq FROM snapshots WHERE session_id = ? ORDER BY seq",
                               (sid,)).fetchall()


def test_every_seq_reads_as_the_full_fold(small_stride, tmp_path) -> None:
    with SQLiteLog(tmp_path / "s.db") as log:
        sid = run(log, 12, tmp_path)
        events = log.read(sid)
        got = rows(log, sid)
        assert len(got) >= 5 and all(base is not None for _, base in got[1:])  # deltas on the one before
        snaps = Snapshots(log)
        for seq in range(len(events)):
            assert snaps.state_at(sid, seq) == fold(events[: seq + 1]), seq
        assert SessionWriter(log).load(sid) == fold(events)
        with SQLiteLog(log.path, readonly=True) as ro:  # a reader uses them, writes nothing
            assert SessionWriter(ro).load(sid) == fold(events)
        # Storage stays linear: each message is stored in one row only.
        data = b"".join(r[0] for r in log.db.conn.execute("SELECT data FROM snapshots"))
        assert data.count(b"2:nul\x00byte") == 1  # the tool result of step 2


def test_compaction_and_a_forks_prompt_rewrite_the_conversation(small_stride, tmp_path) -> None:
    from tests.test_compaction import run_long_session  # a session that compacts three times or more

    log, state, _ = run_long_session(tmp_path, steps=40)
    events = log.read(state.session_id)
    assert state.rewrites >= 3 and Snapshots(log).state_at(state.session_id) == fold(events) == state
    for seq in range(0, len(events), 7):
        assert Snapshots(log).state_at(state.session_id, seq) == fold(events[: seq + 1])
    child = fork(log, state.session_id, 60, system_prompt="new \ud800 prompt").child_session_id
    build_runtime(log, ScriptedProvider(script(3))).run_session(child)
    assert Snapshots(log).state_at(child) == fold(log.read(child))
    assert rows(log, child), "the child's rows build on its parent's"


def test_a_stale_forged_or_damaged_row_is_ignored(small_stride, tmp_path, monkeypatch) -> None:
    with SQLiteLog(tmp_path / "s.db") as log:
        sid = run(log, 6, tmp_path)
        full = fold(log.read(sid))
        seq = rows(log, sid)[-1][0]
        conn = log.db.conn
        (good,) = conn.execute("SELECT data FROM snapshots WHERE session_id = ? AND seq = ?", (sid, seq)).fetchone()

        def with_row(data: bytes) -> None:
            conn.execute("UPDATE snapshots SET data = ? WHERE session_id = ? AND seq = ?", (data, sid, seq))
            assert Snapshots(log).state_at(sid) == full

        with_row(b"garbage")
        marker = tmp_path / "pwned"
        with_row(pickle.dumps((pickle.dumps({"x": os.system}), [])))  # refused: names a function
        evil = type("Evil", (), {"__reduce__": lambda self: (os.system, (f"touch {marker}",))})
        with_row(pickle.dumps((pickle.dumps(evil()), [])))
        assert not marker.exists()
        fields, messages = pickle.loads(good)
        forged = pickle.loads(fields)
        forged["chain_head"] = b"\x00" * 32  # taken from another log
        forged["answer"] = "forged"
        with_row(pickle.dumps((pickle.dumps(forged), messages)))
        with_row(good)
        monkeypatch.setattr(snapshots, "VERSION", "another fold")  # the fold changed: rows ignored
        assert Snapshots(log).state_at(sid) == full
        SessionWriter(log).load(sid)


def test_no_row_over_a_broken_chain(small_stride, tmp_path) -> None:
    with SQLiteLog(tmp_path / "s.db") as log:
        sid = run(log, 3, tmp_path)
        log.db.conn.execute("DELETE FROM snapshots")
        data = bytearray(log.read_raw(sid, 2, 2)[0])
        data[12] ^= 1
        log.db.conn.execute("UPDATE events SET data = ? WHERE session_id = ? AND seq = 2", (bytes(data), sid))
        Snapshots(log).save(fold(log.read(sid)))
        assert rows(log, sid) == []


def test_message_rows_are_built_when_first_read_and_copies_stay_apart() -> None:
    msgs = [Message(role="system", content="\ud800<b>", seq=0),
            Message(role="assistant", tool_calls=[ToolCall(call_id="c", name="n", arguments={"a": [1]})], seq=3)]
    lazy = MessageList.from_rows(MessageList(msgs).rows())
    grown = lazy.copy()
    grown.append(Message(role="user", content="more", seq=4))  # appending builds nothing
    assert all(type(r) is tuple for r in lazy._buf[:2]) and lazy.rows() == MessageList(msgs).rows()
    other = lazy.copy()
    other.append(Message(role="user", content="other", seq=4))
    assert list(lazy) == msgs and len(lazy) == 2
    assert [m.content for m in grown] == ["\ud800<b>", "", "more"] and other[-1].content == "other"
