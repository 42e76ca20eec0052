"""Secrets never land in the log: the stored bytes of a session hold no secret value,
wherever it came from (goal, model reply, tool arguments, tool result)."""
from __future__ import annotations

import json
import os

import pytest

from loopstream.core import events as ev
from loopstream.core.secrets import Redactor, current, is_secret_name, redact
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from loopstream.processors.model import ModelProcessor
from loopstream.processors.orchestrator import Orchestrator
from loopstream.processors.tools import ToolProcessor
from loopstream.providers.base import ModelReply, ToolCall
from loopstream.providers.scripted import ScriptedProvider
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import Runtime, SessionConfig
from loopstream.tools import ToolRegistry, tool

KEY = "sk-test-0123456789abcdefDEADBEEF"


@tool
def leak(note: str = "") -> str:
    """Returns the API key (a tool that prints its environment, say)."""
    return f"the key is {os.environ['OPENAI_API_KEY']} ({note})"


@pytest.fixture
def log(tmp_path):
    with SQLiteLog(tmp_path / "s.db") as log:
        yield log


def run(log, provider, registry, goal, secrets=()):
    rt = Runtime(log, [Orchestrator(), ModelProcessor(provider, registry.specs()), ToolProcessor(registry)],
                 secrets=secrets)
    config = SessionConfig(provider="scripted", model="scripted", tools=registry.names(),
                           system_prompt=f"never print {KEY}")
    sid = rt.start_session(goal, config)
    return sid, rt.run_session(sid)


def test_the_stored_log_bytes_never_contain_the_key(log, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    provider = ScriptedProvider([
        ModelReply(tool_calls=[ToolCall(call_id="1", name="leak", arguments={"note": f"'{KEY}'"})]),
        ModelReply(text=f"Your key: {KEY}. Quoted: \"{KEY}\""),
    ])
    sid, state = run(log, provider, ToolRegistry().add(leak), f"print {KEY} please")
    assert state.status == "done"
    raw = b"".join(log.read_raw(sid))
    assert KEY.encode() not in raw and KEY[3:20].encode() not in raw
    assert raw.count(b"[REDACTED:OPENAI_API_KEY]") >= 6  # prompt, goal, args (twice), result, answer
    events = log.read(sid)
    assert state.answer == "Your key: [REDACTED:OPENAI_API_KEY]. Quoted: \"[REDACTED:OPENAI_API_KEY]\""
    args = json.loads(next(e.payload for e in events if e.type == "ToolRequested").arguments_json)
    assert args == {"note": "'[REDACTED:OPENAI_API_KEY]'"}  # still valid JSON
    assert fold(events) == state  # the model and tools saw what the log holds


def test_loopstream_secrets_and_programmatic_secrets(log, monkeypatch) -> None:
    monkeypatch.setenv("DB_URL", "postgres://u:pw-9f8e7d6c@db/x")
    monkeypatch.setenv("LOOPSTREAM_SECRETS", "DB_URL, MISSING_VAR")
    monkeypatch.setenv("SHORT_TOKEN", "abc123")  # under 8 characters: too short to redact safely
    provider = ScriptedProvider([ModelReply(text="postgres://u:pw-9f8e7d6c@db/x hunter2hunter2 abc123")])
    sid, state = run(log, provider, ToolRegistry(), "connect", secrets=["hunter2hunter2"])
    raw = b"".join(log.read_raw(sid))
    assert b"pw-9f8e7d6c" not in raw and b"hunter2hunter2" not in raw
    assert state.answer == "[REDACTED:DB_URL] [REDACTED:SECRET] abc123"


def test_the_cli_path_redacts_too(log, monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-abcdefghijklmnop")
    rt = build_runtime(log, ScriptedProvider([ModelReply(text="sk-ant-abcdefghijklmnop")]), ToolRegistry())
    sid = rt.start_session("x", SessionConfig(provider="scripted", model="m", tools=[]))
    assert rt.run_session(sid).answer == "[REDACTED:ANTHROPIC_API_KEY]"


def test_secret_names() -> None:
    for name in ("OPENAI_API_KEY", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "MYSQL_ROOT_PASSWORD",
                 "CLIENT_SECRET", "AWS_ACCESS_KEY", "SSH_PRIVATE_KEY"):
        assert is_secret_name(name), name
    for name in ("PATH", "HOME", "TOKENIZERS_PARALLELISM", "LOOPSTREAM_DB", "API_KEY_FILE_PATH"):
        assert not is_secret_name(name), name


def test_redactor_is_exact_nested_and_cheap_when_clean() -> None:
    r = Redactor([("A_TOKEN", 'ab"cd\\efgh-é'), ("B_TOKEN", "abcdefgh"), ("LONG_TOKEN", "abcdefgh-longer")])
    payload = ev.ModelResponded(
        request_id="r", text="abcdefgh-longer and abcdefgh", tool_calls=[ev.ToolCallRecord(
            call_id="c", name="t", arguments_json=json.dumps({"v": 'ab"cd\\efgh-é'}))],
        input_tokens=1, output_tokens=1, latency_ms=1, finish_reason="", mode="native", model="m")
    out = r.payload(payload)
    assert out.text == "[REDACTED:LONG_TOKEN] and [REDACTED:B_TOKEN]"
    assert json.loads(out.tool_calls[0].arguments_json) == {"v": "[REDACTED:A_TOKEN]"}
    clean = ev.GoalReceived(text="nothing secret here")
    assert r.payload(clean) is clean
    assert current(()) is current(())  # compiled once per environment


def test_redact_without_secrets_is_identity(monkeypatch) -> None:
    for k in list(os.environ):
        if is_secret_name(k):
            monkeypatch.delenv(k)
    monkeypatch.delenv("LOOPSTREAM_SECRETS", raising=False)
    p = ev.GoalReceived(text="hello")
    assert redact(p) is p and not current()


def test_a_changed_environment_is_picked_up(monkeypatch) -> None:
    monkeypatch.setenv("SERVICE_TOKEN", "first-token-value")
    assert redact(ev.GoalReceived(text="first-token-value")).text == "[REDACTED:SERVICE_TOKEN]"
    monkeypatch.setenv("SERVICE_TOKEN", "second-token-value")
    assert redact(ev.GoalReceived(text="first-token-value second-token-value")).text == \
        "first-token-value [REDACTED:SERVICE_TOKEN]"
