"""Compaction keeps a long session under its context budget; the log keeps everything,
so replaying before a compaction shows the full context."""
from __future__ import annotations

from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from loopstream.processors.compaction import compaction_range
from loopstream.providers.base import Message, ModelReply, ToolCall
from loopstream.providers.scripted import ScriptedProvider, adder_script
from loopstream.providers.tokens import estimate_tokens
from loopstream.replay import check_determinism
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig

BUDGET = 150


def run_long_session(tmp_path, provider=None, steps=40):
    log = SQLiteLog(tmp_path / "c.db")
    seen_contexts: list[list[Message]] = []
    inner = adder_script(steps)

    def script(messages):
        if messages and messages[0].content.startswith("You compress"):
            return ModelReply(text="Counted with add; the latest result is in the recent turns.")
        seen_contexts.append(list(messages))
        return inner(messages)

    provider = provider or ScriptedProvider(script)
    rt = build_runtime(log, provider)
    config = SessionConfig(provider="scripted", model="s", tools=["add"], max_steps=steps + 5,
                           system_prompt="You count.", policy={"compaction": {"context_budget_tokens": BUDGET}})
    state = rt.run_session(rt.start_session("count to forty", config))
    return log, state, seen_contexts


def test_long_session_stays_under_budget_through_compaction(tmp_path) -> None:
    log, state, contexts = run_long_session(tmp_path)
    assert state.status == "done" and state.answer == "The result is 40."
    events = log.read(state.session_id)
    compactions = [e for e in events if e.type == "ContextCompacted"]
    assert len(compactions) >= 3
    # The decisions to compact are re-made by the driver from the log (summaries taken from it).
    assert check_determinism(log, state.session_id).ok
    # Every model call saw a context within budget, while the whole transcript is far over it.
    sizes = [estimate_tokens(c, "scripted") for c in contexts]
    assert max(sizes) <= BUDGET, sizes
    transcript_tokens = estimate_tokens(_uncompacted(events), "scripted")
    assert transcript_tokens > 3 * BUDGET
    for c in compactions:
        assert c.payload.method == "model" and c.payload.tokens_after < c.payload.tokens_before
        assert c.payload.from_seq == 3 and c.payload.to_seq < c.seq  # from the first reply on
    # The system prompt and the goal stay verbatim through every compaction.
    assert [m.content for m in state.messages[:2]] == ["You count.", "count to forty"]


def _uncompacted(events):
    """The conversation as it would be without compaction: fold with the compactions left out."""
    from loopstream.core.state import SessionState, apply

    state = SessionState()
    for e in events:
        if e.type in ("CompactionRequested", "ContextCompacted"):
            continue
        apply(state, e.model_copy(update={"seq": state.seq + 1}))
    return state.messages


def test_replay_before_the_compaction_point_shows_the_full_context(tmp_path) -> None:
    log, state, contexts = run_long_session(tmp_path)
    events = log.read(state.session_id)
    first = next(e for e in events if e.type == "ContextCompacted")
    before = fold(events[: first.seq])
    after = fold(events[: first.seq + 1])
    replaced = [m for m in before.messages if first.payload.from_seq <= m.seq <= first.payload.to_seq]
    assert len(replaced) >= 2
    # Before: every original message of the range, verbatim, as the model saw it.
    assert replaced == [m for m in contexts[len([e for e in events[: first.seq] if e.type == "ModelResponded"]) - 1]
                        if first.payload.from_seq <= (m.seq or -1) <= first.payload.to_seq]
    # After: the range is one summary message; nothing outside the range changed.
    assert [m for m in after.messages if m.content.startswith("[Summary")][0].seq == first.payload.from_seq
    assert [m for m in after.messages if m.seq is not None and m.seq > first.payload.to_seq] == \
        [m for m in before.messages if m.seq is not None and m.seq > first.payload.to_seq]


def test_extractive_fallback_without_a_model(tmp_path) -> None:
    log = SQLiteLog(tmp_path / "e.db")
    rt = build_runtime(log, ScriptedProvider(adder_script(30)), summarize_with_model=False)
    config = SessionConfig(provider="scripted", model="s", tools=["add"], max_steps=40,
                           policy={"compaction": {"context_budget_tokens": BUDGET}})
    state = rt.run_session(rt.start_session("count", config))
    assert state.status == "done"
    methods = {e.payload.method for e in log.read(state.session_id) if e.type == "ContextCompacted"}
    assert methods == {"extractive"}


def test_range_never_splits_a_tool_call_from_its_result() -> None:
    msgs = [Message(role="system", content="s", seq=0), Message(role="user", content="g", seq=1)]
    seq = 2
    for i in range(5):
        msgs.append(Message(role="assistant", content="", seq=seq,
                            tool_calls=[ToolCall(call_id=str(i), name="add")]))
        msgs.append(Message(role="tool", content=str(i), seq=seq + 2))
        seq += 4
    first, last = compaction_range(msgs, keep_recent=3)
    assert first == 2
    after = [m for m in msgs if m.seq > last]
    assert after[0].role == "assistant" and len(after) >= 3
    assert compaction_range(msgs[:4], keep_recent=2) is None
