"""Sessions for the observability tests, run by the real in-process driver over a real
SQLite log with a scripted model: one with a retried model call, a failed tool call and a
good one (`rich_session`), and plain adder sessions."""
from __future__ import annotations

from pathlib import Path

from loopstream.core.policy import SessionPolicy
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.providers.base import Message, ModelReply, ProviderError, ToolCall
from loopstream.providers.scripted import ScriptedProvider, adder_script
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig
from loopstream.tools.builtin import default_registry


def rich_script():
    """Fails once (retryable 503), then divides by zero (ToolFailed), then adds, then answers."""
    calls = {"n": 0}

    def script(messages: list[Message]) -> ModelReply:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ProviderError("overloaded", retryable=True, status=503, kind="server_error")
        tools = [m for m in messages if m.role == "tool"]
        if not tools:
            return ModelReply(text="", tool_calls=[ToolCall(call_id="d1", name="divide", arguments={"a": 1, "b": 0})],
                              input_tokens=30, output_tokens=7, mode="native")
        if len(tools) == 1:
            return ModelReply(text="", tool_calls=[ToolCall(call_id="a1", name="add", arguments={"a": 2, "b": 2})],
                              input_tokens=40, output_tokens=7, mode="native")
        return ModelReply(text="The result is 4.", input_tokens=50, output_tokens=6)

    return script


def run_session(log: SQLiteLog, goal: str, provider: ScriptedProvider, *, agent: str = "default",
                policy: SessionPolicy | None = None) -> str:
    runtime = build_runtime(log, provider, default_registry())
    config = SessionConfig(provider="scripted", model=provider.model, tools=default_registry().names(),
                           agent=agent, policy=policy or SessionPolicy.model_validate(
                               {"retries": {"base_ms": 20, "max_ms": 40}}))
    sid = runtime.start_session(goal, config)
    runtime.run_session(sid)
    return sid


def rich_session(db: Path) -> str:
    with SQLiteLog(db) as log:
        return run_session(log, "What is 2 + 2?", ScriptedProvider(rich_script(), model="scripted:rich"))


def adder_session(db: Path, steps: int = 2, agent: str = "default") -> str:
    with SQLiteLog(db) as log:
        return run_session(log, f"count to {steps}", ScriptedProvider(adder_script(steps), model=f"scripted:adder:{steps}"),
                           agent=agent)
