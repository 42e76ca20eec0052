"""Models built without validation (core/construct.py, the fold's messages) are the models
validation builds: same fields, same values, equal, and they validate again unchanged."""
from __future__ import annotations

from loopstream.core import events as ev
from loopstream.core.construct import construct, factory
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import _message, _tool_call
from loopstream.providers.base import Message, ToolCall
from loopstream.providers.scripted import ScriptedProvider, adder_script
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig


def test_the_folds_builders_match_validation() -> None:
    call = _tool_call("c1", "add", '{"a": 1, "b": 2}')
    assert call == ToolCall(call_id="c1", name="add", arguments={"a": 1, "b": 2})
    assert _tool_call("c2", "add", "not json").arguments == {"_raw": "not json"}
    assert _message("assistant", "hi", 3, tool_calls=[call]) == Message(role="assistant", content="hi",
                                                                        tool_calls=[call], seq=3)
    assert _message("tool", "3", 5, tool_call_id="c1", name="add") == Message(
        role="tool", content="3", tool_call_id="c1", name="add", seq=5)


def test_construct_and_factory_build_what_validation_builds() -> None:
    fields = {"call_id": "c1", "name": "add", "result": "3", "latency_ms": 1}
    validated = ev.ToolCompleted(**fields)
    for built in (construct(ev.ToolCompleted, dict(fields)), factory(ev.ToolCompleted)(dict(fields))):
        assert built == validated and type(built) is ev.ToolCompleted
        assert built.model_dump() == validated.model_dump()
        assert ev.ToolCompleted.model_validate(built.model_dump()) == built
        assert built.model_copy(update={"result": "4"}).result == "4"  # a normal, copyable model
    partial = construct(ev.GuardrailTripped, {"stage": "input", "rule": "r", "message": "m", "action": "stop"})
    assert partial.call_id is None  # missing fields: model_construct fills the defaults


def test_every_message_of_a_folded_session_validates_unchanged(tmp_path) -> None:
    with SQLiteLog(tmp_path / "c.db") as log:
        rt = build_runtime(log, ScriptedProvider(adder_script(3)))
        sid = rt.start_session("count", SessionConfig(provider="scripted", model="s", tools=["add"],
                                                      system_prompt="Be brief."))
        state = rt.run_session(sid)
    assert state.status == "done" and len(state.messages) == 9
    for m in state.messages:
        assert Message.model_validate(m.model_dump()) == m
