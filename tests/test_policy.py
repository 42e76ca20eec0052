"""The typed session policy: a policy file is validated whole before any session starts
(file, dotted key, reason on one line), the policy is recorded in SessionStarted, and
every config an older session recorded still folds."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from loopstream.core import events as ev
from loopstream.core.policy import (
    Answers,
    Budgets,
    Guardrails,
    Loops,
    PolicyError,
    Retries,
    SessionPolicy,
    Shaping,
    load_policy,
    recorded_policy,
    reference,
)
from loopstream.core.processor import Emit
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import SessionState, fold
from loopstream.providers.base import ModelReply, ToolCall
from loopstream.providers.scripted import ScriptedProvider, adder_script
from loopstream.replay import read_archive
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.writer import SessionConfig, build_events
from tests.test_cli import cli

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "sessions"

# (what the file says, the dotted key the error must name, words of the reason)
BAD_FILES = [
    pytest.param("[[permissions]]\ntool = 'add'\naction = 'deny'\nargs = { a = 5 }",
                 "permissions[0].args.a", "expected a string, got 5", id="non-string-arg-pattern"),
    pytest.param("[[permissions]]\ntool = 5\naction = 'deny'", "permissions[0].tool", "expected a string, got 5",
                 id="tool-is-a-number"),
    pytest.param("permissions = 'deny everything'", "permissions", "expected a table", id="string-for-a-table"),
    pytest.param("guardrails = 'strict'", "guardrails", "expected a table", id="string-for-guardrails"),
    pytest.param("[guardrails]\ninput_deny = 'xyz'", "guardrails.input_deny", "expected an array, got 'xyz'",
                 id="string-for-a-list"),
    pytest.param("[guardrails]\ninput_deny = ['ok', '(unclosed']", "guardrails.input_deny[1]",
                 "bad regular expression '(unclosed'", id="bad-regex"),
    pytest.param("[guardrails]\ninptu_deny = ['x']", "guardrails.inptu_deny", "unknown key; did you mean 'input_deny'",
                 id="misspelt-key"),
    pytest.param("colour = 'blue'", "colour", "unknown key", id="unknown-section"),
    pytest.param("[[permissions]]\ntool = 'x'\naction = 'deny'\nargs = { a = 're:(' }", "permissions[0].args.a",
                 "bad regular expression", id="bad-arg-regex"),
    pytest.param("[[permissions]]\ntool = 'x'\naction = 'perhaps'", "permissions[0].action",
                 "should be 'allow', 'deny' or 'ask'", id="bad-action"),
    pytest.param("default = 'maybe'", "default", "should be 'allow', 'deny' or 'ask'", id="bad-default"),
    pytest.param("[guardrails]\non_output = 'shrug'", "guardrails.on_output", "should be 'tell_model' or 'stop'",
                 id="bad-on-output"),
    pytest.param("[guardrails]\nreview_tool_calls = 'yes'", "guardrails.review_tool_calls", "expected true or false",
                 id="string-for-a-bool"),
    pytest.param("[guardrails]\noutput_schema = { type = 'thing' }", "guardrails.output_schema",
                 "not a JSON schema", id="bad-json-schema"),
    pytest.param("[budgets]\nmax_tokens = '100'", "budgets.max_tokens", "expected an integer, got '100'",
                 id="string-for-an-int"),
    pytest.param("[budgets]\nmax_tokens = 0", "budgets.max_tokens", "greater than or equal to 1", id="zero-budget"),
    pytest.param("[permissions]\ndefault = 'deny'\n[[permissions.rules]]\nargs = {}", "permissions.rules[0].action",
                 "required key missing", id="rule-without-action"),
]


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "bad.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(("text", "key", "reason"), BAD_FILES)
def test_a_bad_policy_file_names_the_file_the_key_and_the_reason(tmp_path, text, key, reason) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert reason in message and "\n" not in message


@pytest.mark.parametrize(("data", "reason"), [
    (b"[guardrails]\ninput_deny = ['caf\xe9']\n", ": not UTF-8 text (line 2, byte 31"),
    (b"this is = = not toml", ": not valid TOML"),
    (None, "no such file"),
])
def test_unreadable_policy_files(tmp_path, data, reason) -> None:
    path = write(tmp_path, data) if data is not None else tmp_path / "missing.toml"
    with pytest.raises(PolicyError, match=re.escape(reason)):
        load_policy(path)


@pytest.mark.slow
@pytest.mark.parametrize("text", [
    *[p.values[0] for p in BAD_FILES if p.id in ("non-string-arg-pattern", "tool-is-a-number", "string-for-a-table",
                                                   "string-for-a-list", "bad-regex", "misspelt-key")],
    b"[guardrails]\ninput_deny = ['\xff\xfe']\n",
])
def test_the_cli_rejects_a_bad_policy_before_any_session(tmp_path, text) -> None:
    """A user mistake: exit 2, one line naming the problem, no traceback, nothing written."""
    path = write(tmp_path, text)
    r = cli("run", "add 1 and 2", "--provider", "scripted", "--model", "adder:2", "--policy", str(path), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and str(path) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (tmp_path / ".loopstream").exists()  # no log, so no session


def test_the_older_file_shape_and_the_nested_one_load_alike(tmp_path) -> None:
    old = write(tmp_path, "default = 'ask'\n[[permissions]]\ntool = 'add'\naction = 'deny'\nreason = 'no'\n"
                          "[guardrails]\ninput_deny = ['(?i)ignore']\n")
    new = tmp_path / "new.toml"
    new.write_text("[permissions]\ndefault = 'ask'\n[[permissions.rules]]\ntool = 'add'\naction = 'deny'\n"
                   "reason = 'no'\n[guardrails]\ninput_deny = ['(?i)ignore']\n[budgets]\nmax_tokens = 900\n"
                   "[retries]\nbase_ms = 10\n")
    a, b = load_policy(old), load_policy(new)
    assert a.permissions == b.permissions and a.permissions.rules[0].action == "deny"
    assert a.guardrails.input_deny == ["(?i)ignore"] and b.budgets.max_tokens == 900 and b.retries.base_ms == 10


@pytest.mark.slow
def test_cli_flags_override_the_policy_file_and_the_session_records_it(tmp_path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[budgets]\nmax_tokens = 5\nmax_wall_seconds = 600\n[[permissions.rules]]\ntool = 'shell'\n"
                    "action = 'deny'\nreason = 'not today'\n")
    r = cli("run", "add", "--provider", "scripted", "--model", "adder:2", "--policy", str(path),
            "--max-tokens", "100000", cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # 2 steps of 15 tokens: over the file's 5, under the flag's 100000
    with SQLiteLog(tmp_path / ".loopstream" / "loopstream.db") as log:
        (session,) = log.sessions()
        events = log.read(session.session_id)
    recorded = json.loads(events[0].payload.config_json)
    assert recorded["budgets"] == {"max_tokens": 100000, "max_wall_seconds": 600}
    state = fold(events)
    assert state.status == "done" and state.input_tokens + state.output_tokens > 5
    assert state.policy.budgets.max_tokens == 100000 and state.policy.permissions.rules[0].reason == "not today"


OLD = SessionPolicy(loops=Loops(enabled=False), shaping=Shaping(enabled=False),
                    answers=Answers(enabled=False))  # what "{}" folds to


def test_the_default_policy_records_as_before_and_round_trips() -> None:
    # a session without a policy records only the settings of loop detection, shaping and the
    # answer checks (whole: the defaults may change) ...
    assert json.loads(SessionPolicy().to_config_json()) == {"loops": Loops().model_dump(),
                                                            "shaping": Shaping().model_dump()}
    on = SessionPolicy(answers=Answers(enabled=True))
    assert json.loads(on.to_config_json())["answers"] == Answers(enabled=True).model_dump()
    assert recorded_policy(on.to_config_json()) == on
    assert recorded_policy(SessionPolicy().to_config_json()) == SessionPolicy()
    # ... and one recorded before loop detection and shaping existed replays without them
    assert recorded_policy("{}") == OLD
    assert json.loads(OLD.to_config_json()) == {"loops": {"enabled": False}, "shaping": {"enabled": False}}
    # ... and one recorded with loops and shaping but without the answer checks runs without those
    assert recorded_policy(SessionPolicy().to_config_json()).answers.enabled is False
    policy = SessionPolicy(budgets=Budgets(max_tokens=50, max_cost_usd=0.5, price_per_mtok={"input": 3, "output": 15}),
                           guardrails=Guardrails(output_deny=["x"], on_output="stop"), fallback_models=["b"])
    assert recorded_policy(policy.to_config_json()) == policy
    assert json.loads(policy.to_config_json())["guardrails"] == {"on_output": "stop", "output_deny": ["x"]}


def test_the_reference_in_the_docs_is_current() -> None:
    docs = (ROOT / "docs" / "policy.md").read_text()
    table = re.search(r"<!-- reference:begin -->\n(.*?)\n<!-- reference:end -->", docs, re.S)
    assert table and table.group(1) == reference()
    assert all(f"`{key}`" in reference() for key in ("budgets.max_tokens", "permissions.rules[].args",
                                                      "guardrails.max_output_retries", "timeouts.tool_timeout_s"))


# -- what older sessions recorded ------------------------------------------------------
def started_config(name: str) -> str:
    from loopstream.core.codec import decode

    return decode(read_archive(FIXTURES / f"{name}.avro")[0]).payload.config_json


def test_every_fixture_config_folds_into_the_typed_policy() -> None:
    policies = {p.stem: recorded_policy(started_config(p.stem)) for p in FIXTURES.glob("*.avro")}
    assert all(p.unreadable is None for p in policies.values())
    old = policies["fallback_then_failed"]  # recorded flat: {"max_model_attempts": 2, "retry_base_ms": 1, …}
    assert old.retries == Retries(max_model_attempts=2, base_ms=1, max_ms=2)
    assert old.fallback_models == ["scripted:small"]
    assert policies["reviewed_then_blocked"].guardrails.review_tool_calls is True
    assert policies["adder_done"] == OLD  # recorded before loop detection and shaping


@pytest.mark.parametrize(("config", "expected"), [
    ({"max_tokens": 10, "max_wall_seconds": 2.5, "context_budget_tokens": 300, "compaction_keep_recent": 2,
      "compaction_summary_chars": 90, "tool_timeout_s": 7, "max_tool_attempts": 4, "retry_after_max_ms": 9,
      "max_cost_usd": 1, "price_per_mtok": {"input": 1, "output": 2}, "checkpoint_exclude": ["/x.db"],
      "progress_updates": True},
     {"budgets": {"max_tokens": 10, "max_wall_seconds": 2.5, "max_cost_usd": 1.0,
                  "price_per_mtok": {"input": 1.0, "output": 2.0}},
      # a budget recorded before estimator 2 existed is measured as it was then
      "compaction": {"context_budget_tokens": 300, "keep_recent": 2, "summary_chars": 90, "estimator": 1},
      "timeouts": {"tool_timeout_s": 7.0}, "retries": {"max_tool_attempts": 4, "retry_after_max_ms": 9},
      "checkpoint_exclude": ["/x.db"], "progress_updates": True, "loops": {"enabled": False},
      "shaping": {"enabled": False}}),
    ({"max_model_attempts": "2", "something_else": 1, "guardrails": {"on_output": "stop", "later_key": 1}},
     {"retries": {"max_model_attempts": 2}, "guardrails": {"on_output": "stop"}, "loops": {"enabled": False},
      "shaping": {"enabled": False}}),
])
def test_old_flat_configs_are_read_as_the_old_code_read_them(config, expected) -> None:
    """Every key the old code read lands in its section; values it coerced with int()/float()
    are coerced; keys it ignored are ignored."""
    policy = recorded_policy(json.dumps(config))
    assert policy.unreadable is None and json.loads(policy.to_config_json()) == expected


def test_the_deprecated_extra_still_works_and_records_the_typed_policy() -> None:
    with pytest.warns(DeprecationWarning):
        config = SessionConfig(provider="p", model="m", tools=[], extra={"max_tokens": 10, "retry_base_ms": 1})
    assert config.policy == SessionPolicy(budgets=Budgets(max_tokens=10), retries=Retries(base_ms=1))
    assert SessionConfig(provider="p", model="m", tools=[], policy={"budgets": {"max_tokens": 10}}).policy.budgets \
        == Budgets(max_tokens=10)
    with pytest.raises(PolicyError, match=r"SessionConfig.policy: budgets.max_tokenz: unknown key"):
        SessionConfig(provider="p", model="m", tools=[], policy={"budgets": {"max_tokenz": 10}})


def test_an_agents_file_policy_is_validated_when_the_worker_starts(tmp_path) -> None:
    from loopstream.runtime.assembly import AgentsFileError, default_agents

    agents = tmp_path / "agents.json"
    careful = {"tools": ["add"], "policy": {"guardrails": {"review_tool_calls": True}}}
    agents.write_text(json.dumps({"careful": careful}))
    assert default_agents("scripted", "s", agents)["careful"].policy.guardrails.review_tool_calls is True
    agents.write_text(json.dumps({"careful": {"policy": {"guardrails": {"review_tool_call": True}}}}))
    with pytest.raises(AgentsFileError, match=r"agent 'careful': SessionConfig.policy: guardrails.review_tool_call: "
                                              r"unknown key; did you mean 'review_tool_calls'"):
        default_agents("scripted", "s", agents)


def test_a_session_recorded_with_a_policy_that_crashed_every_resume_now_fails_cleanly(tmp_path) -> None:
    """The old loader accepted `args = { a = 5 }`; the tool processor then raised on every
    resume. Such a recorded session now folds, denies the call and fails saying why."""
    config = json.dumps({"permissions": {"default": "allow", "rules": [
        {"tool": "add", "args": {"a": 5}, "action": "deny"}]}})
    with SQLiteLog(tmp_path / "old.db") as log:
        rt = build_runtime(log, ScriptedProvider([
            ModelReply(tool_calls=[ToolCall(call_id="1", name="add", arguments={"a": 5, "b": 1})]),
            ModelReply(text="done")]))
        blank = SessionState(session_id="old", correlation_id="old")
        started = ev.SessionStarted(agent="a", provider="scripted", model="s", system_prompt="", tools=["add"],
                                    max_steps=5, workdir=".", config_json=config)
        log.append("old", build_events(blank, None, [Emit(started), Emit(ev.GoalReceived(text="add"))], "test"), 0)
        state = rt.run_session("old")
        assert state.status == "failed" and state.policy.unreadable
        assert "permissions.rules[0].args.a: expected a string, got 5" in state.error
        (failed,) = [e.payload for e in log.read("old") if e.type == "SessionFailed"]
        assert failed.error_kind == "policy"
        assert rt.run_session("old").status == "failed"  # and a second resume is just as calm


@pytest.mark.slow
def test_resuming_such_a_session_from_the_cli_ends_it_with_one_line(tmp_path) -> None:
    """Before: a traceback on every `loopstream resume`. Now: the session fails, saying why."""
    config = json.dumps({"permissions": {"rules": [{"tool": 5, "action": "deny"}]}})
    db = tmp_path / ".loopstream" / "loopstream.db"
    db.parent.mkdir()
    with SQLiteLog(db) as log:
        blank = SessionState(session_id="oldsession", correlation_id="oldsession")
        started = ev.SessionStarted(agent="a", provider="scripted", model="adder:1", system_prompt="", tools=["add"],
                                    max_steps=5, workdir=str(tmp_path), config_json=config)
        log.append("oldsession", build_events(blank, None, [Emit(started), Emit(ev.GoalReceived(text="add"))],
                                              "test"), 0)
    first = cli("resume", "oldsession", "--provider", "scripted", "--model", "adder:1", "-q", cwd=tmp_path)
    again = cli("resume", "oldsession", "--provider", "scripted", "--model", "adder:1", "-q", cwd=tmp_path)
    for r in (first, again):
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert first.returncode == 1 and "failed: the session's recorded policy: permissions.rules[0].tool: expected " \
        "a string, got 5" in first.stderr, first.stderr
    assert again.returncode == 2 and "already ended (failed)" in again.stderr


def test_a_recorded_unreadable_policy_denies_tool_calls_even_mid_session(tmp_path) -> None:
    """Fail closed: a tool processor that meets an unreadable policy (say a Kafka tool worker
    resuming a call) denies the call instead of running it under default rules."""
    from loopstream.core.state import PendingCall
    from loopstream.processors.tools import ToolProcessor
    from loopstream.tools.builtin import default_registry

    state = fold([])
    state.policy = recorded_policy('{"guardrails": {"input_deny": "xyz"}}')
    state.pending_calls["c"] = PendingCall(ToolCall(call_id="c", name="add", arguments={"a": 1, "b": 2}), 0)
    state.tools = ["add"]
    request = ev.Event(event_id="e", session_id="s", seq=0, type="ToolRequested", time=0, causation_id=None,
                       correlation_id="s", actor="t", schema_version=1,
                       payload=ev.ToolRequested(call_id="c", name="add", arguments_json='{"a": 1, "b": 2}', step=1))
    (emit,) = ToolProcessor(default_registry()).handle(request, state, 0)
    assert emit.payload.error_kind == "permission_denied"
    assert "guardrails.input_deny: expected an array" in emit.payload.message


def test_a_policy_built_in_python_drives_a_session(tmp_path) -> None:
    with SQLiteLog(tmp_path / "p.db") as log:
        rt = build_runtime(log, ScriptedProvider(adder_script(5)))
        sid = rt.start_session("count", SessionConfig(provider="scripted", model="s", tools=["add"], max_steps=20,
                                                      policy=SessionPolicy(budgets=Budgets(max_tokens=1))))
        state = rt.run_session(sid)
    assert state.status == "failed" and state.error.startswith("token budget exceeded")
