"""Shaping (processors/shaping.py): what a model is sent fits a small context — a file read
twice is sent once, a long result is windowed, the last step asks for the answer — while the
log keeps every message whole. Real SQLite log, a scripted model that records what it is sent."""
from __future__ import annotations

import pytest

from loopstream.core.conversation import Message
from loopstream.core.policy import recorded_policy
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.processors.shaping import LAST_STEP
from loopstream.providers.base import ModelReply, ToolCall
from loopstream.providers.scripted import ScriptedProvider
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig


class Recorder:
    """A script that replays `replies` in order and keeps every conversation it was sent."""

    def __init__(self, replies: list[ModelReply]) -> None:
        self.replies, self.sent = replies, []

    def __call__(self, messages: list[Message]) -> ModelReply:
        self.sent.append(list(messages))
        return self.replies[min(len(self.sent), len(self.replies)) - 1]


def read(i: int, path: str, **more) -> ModelReply:
    return ModelReply(tool_calls=[ToolCall(call_id=f"r{i}", name="read_file", arguments={"path": path, **more})])


def run(tmp_path, replies, max_steps: int = 8, **policy):
    script = Recorder(replies)
    with SQLiteLog(tmp_path / "shaping.db") as log:
        rt = build_runtime(log, ScriptedProvider(script))
        sid = rt.start_session("read the files", SessionConfig(
            provider="scripted", model="scripted", tools=["read_file"], workdir=str(tmp_path),
            max_steps=max_steps, policy={"loops": {"enabled": False}, **policy}))
        state = rt.run_session(sid)
    return script.sent, state


@pytest.fixture
def files(tmp_path):
    (tmp_path / "notes.txt").write_text("line of notes\n" * 40)  # 560 characters
    (tmp_path / "big.txt").write_text("".join(f"{i:06d}\n" for i in range(5000)))  # 35,000 characters
    return tmp_path


def tool_texts(messages: list[Message]) -> list[str]:
    return [m.content for m in messages if m.role == "tool"]


def test_a_file_read_twice_is_sent_once_and_the_log_keeps_both(files) -> None:
    replies = [read(1, "notes.txt"), read(2, "notes.txt", offset=0), ModelReply(text="done")]
    sent, state = run(files, replies)
    first, second = tool_texts(sent[-1])
    assert first.startswith("[the same 560 characters as the later result of read_file")
    assert second == (files / "notes.txt").read_text()
    assert [m.content for m in state.messages if m.role == "tool"] == [second, second]  # the log: whole


def test_a_long_result_is_windowed_with_a_way_to_read_more(files) -> None:
    sent, state = run(files, [read(1, "big.txt"), ModelReply(text="done")], shaping={"max_result_chars": 4000})
    [shown] = tool_texts(sent[-1])
    [whole] = tool_texts(state.messages)  # the log: the result as the tool returned it (the writer's cap)
    assert len(whole) > 10_000 and whole.startswith((files / "big.txt").read_text()[:10_000])
    assert len(shown) < 4300 and shown.startswith(whole[:3000]) and shown.endswith(whole[-1000:])
    assert "characters left out" in shown and "offset and limit" in shown


def test_the_last_step_asks_for_the_final_answer(files) -> None:
    sent, state = run(files, [read(1, "notes.txt"), read(2, "big.txt"), ModelReply(text="done")], max_steps=2)
    assert sent[0][-1].content != LAST_STEP
    assert sent[1][-1].role == "user" and sent[1][-1].content == LAST_STEP
    assert all(m.content != LAST_STEP for m in state.messages)  # never written to the log


def test_shaping_off_sends_the_conversation_whole(files) -> None:
    replies = [read(1, "notes.txt"), read(2, "notes.txt", offset=0), ModelReply(text="done")]
    sent, _ = run(files, replies, max_steps=3, shaping={"enabled": False})
    assert tool_texts(sent[-1]) == [(files / "notes.txt").read_text()] * 2
    assert sent[-1][-1].content != LAST_STEP


def test_sessions_recorded_before_shaping_run_without_it() -> None:
    assert recorded_policy("{}").shaping.enabled is False
    assert recorded_policy('{"shaping": {"enabled": true, "max_result_chars": 10}}').shaping.max_result_chars == 10
