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


def test_the_redactor_is_reused_until_the_environment_or_the_extra_secrets_change(monkeypatch) -> None:
    monkeypatch.setenv("SERVICE_TOKEN", "first-token-value")
    extra = {"MINE": "programmatic-value"}
    first = current(extra)
    assert current(extra) is first and current(dict(extra)) is first  # equal inputs: the same compiled one
    extra["OTHER"] = "another-programmatic-value"  # the same dict, changed in place
    assert redact(ev.GoalReceived(text="another-programmatic-value"), extra).text == "[REDACTED:OTHER]"
    monkeypatch.setenv("UNRELATED_SETTING", "x")  # any change of the environment is looked at again
    assert redact(ev.GoalReceived(text="first-token-value"), extra).text == "[REDACTED:SERVICE_TOKEN]"
    monkeypatch.delenv("SERVICE_TOKEN")
    assert redact(ev.GoalReceived(text="first-token-value"), ("programmatic-value",)).text == "first-token-value"


# -- names, shapes and URLs --------------------------------------------------------------
STRIPE = "sk_live_51HxAbCdEfGhIjKlMnOpQrStUv"
GH_PAT = "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"
DB_PASS = "correct-horse-battery"
DATABASE_URL = "postgres://app:s3cr3t-pw-42@db.internal:5432/prod"


@pytest.fixture
def leaky_env(monkeypatch):
    monkeypatch.setenv("STRIPE_KEY", STRIPE)
    monkeypatch.setenv("GH_PAT", GH_PAT)
    monkeypatch.setenv("DB_PASS", DB_PASS)
    monkeypatch.setenv("DATABASE_URL", DATABASE_URL)


@tool
def print_env(names: str) -> str:
    """Prints environment variables (a tool that dumps its config, say)."""
    return "\n".join(f"{n}={os.environ.get(n, '')}" for n in names.split(","))


def test_secrets_named_like_database_url_stripe_key_gh_pat_db_pass_never_reach_the_log(log, leaky_env) -> None:
    names = "STRIPE_KEY,GH_PAT,DB_PASS,DATABASE_URL"
    provider = ScriptedProvider([
        ModelReply(tool_calls=[ToolCall(call_id="1", name="print_env", arguments={"names": names})]),
        ModelReply(text=f"Found {STRIPE} and {DB_PASS}; the db is {DATABASE_URL}"),
    ])
    sid, state = run(log, provider, ToolRegistry().add(print_env), f"check {GH_PAT}")
    assert state.status == "done"
    raw = b"".join(log.read_raw(sid))
    for value in (STRIPE, GH_PAT, DB_PASS, DATABASE_URL, "s3cr3t-pw-42"):
        assert value.encode() not in raw, value
    result = next(e.payload.result for e in log.read(sid) if e.type == "ToolCompleted")
    assert result == ("STRIPE_KEY=[REDACTED:STRIPE_KEY]\nGH_PAT=[REDACTED:GH_PAT]\nDB_PASS=[REDACTED:DB_PASS]\n"
                      "DATABASE_URL=[REDACTED:DATABASE_URL]")
    assert state.answer == "Found [REDACTED:STRIPE_KEY] and [REDACTED:DB_PASS]; the db is [REDACTED:DATABASE_URL]"


@pytest.mark.parametrize(("text", "kind"), [
    ("sk-proj-Ab3dEfGhIjKlMnOpQrStUvWxYz0123456789", "openai-key"),
    ("sk-ant-api03-abcdefghijklmnop0123456789-xyz", "openai-key"),
    ("ghp_0123456789abcdefghijABCDEFGHIJ012345", "github-token"),
    ("github_pat_11ABCDEFG0123456789_abcdefghijklmnop", "github-token"),
    ("xoxb-123456789012-abcdefghijkl", "slack-token"),
    ("AKIAIOSFODNN7EXAMPLE", "aws-access-key-id"),
    ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "stripe-key"),
    ("rk_test_4eC39HqLyjWDarjtT1zdp7dc", "stripe-key"),
    ("AIzaSyA1234567890abcdefghijklmnopqrstuv", "google-api-key"),
    ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "jwt"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow...\n-----END RSA PRIVATE KEY-----", "private-key"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----", "private-key"),
])
def test_well_known_token_shapes_are_redacted_wherever_they_come_from(text, kind) -> None:
    out = redact(ev.ToolCompleted(call_id="c", name="t", result=f"before {text} after", latency_ms=1))
    assert out.result == f"before [REDACTED:{kind}] after"


def test_a_password_in_any_url_is_redacted_and_the_rest_kept() -> None:
    args = json.dumps({"dsn": "mysql://root:hunter2@10.0.0.5/app", "other": "https://a.example/x@y"})
    out = redact(ev.ToolRequested(call_id="c", name="t", arguments_json=args, step=1))
    assert json.loads(out.arguments_json) == {"dsn": "mysql://root:[REDACTED:url-password]@10.0.0.5/app",
                                              "other": "https://a.example/x@y"}


@pytest.mark.parametrize("text", [
    "sk-learn-compatible-estimator-module", "ghost_town_0123456789abcdefghijklmnopqrst", "eyJhbGci",
    "https://user@example.com/path", "AKIA is an AWS prefix", "skip_live_events", "see https://x.org/@me:1",
])
def test_ordinary_text_is_left_alone(text, monkeypatch) -> None:
    for k in list(os.environ):
        if is_secret_name(k):
            monkeypatch.delenv(k)
    p = ev.GoalReceived(text=text)
    assert redact(p) is p


def test_widened_names_and_values_make_an_env_var_secret(log, monkeypatch) -> None:
    for name in ("STRIPE_KEY", "GH_PAT", "DB_PASS", "DB_PWD", "GOOGLE_CREDENTIALS", "NPM_AUTH", "APIKEY"):
        assert is_secret_name(name), name
    for name in ("PWD", "OLDPWD", "SSH_AUTH_SOCK", "PYTHONPATH", "KEYBOARD", "PASSAGE_DIR", "XDG_DATA_DIRS"):
        assert not is_secret_name(name), name
    monkeypatch.setenv("UPSTREAM", "https://deploy:tok-77aa88bb@git.example.com/repo.git")  # by value: a URL password
    monkeypatch.setenv("SOMETHING", "ghp_0123456789abcdefghijABCDEFGHIJ012345")  # by value: a token shape
    out = redact(ev.GoalReceived(text="https://deploy:tok-77aa88bb@git.example.com/repo.git and "
                                      "ghp_0123456789abcdefghijABCDEFGHIJ012345"))
    assert out.text == "[REDACTED:UPSTREAM] and [REDACTED:SOMETHING]"


# -- what the tool gets ------------------------------------------------------------------
def write_session(log, work, goal: str, content: str, **policy):
    from loopstream.tools.builtin import default_registry

    registry = default_registry(allow_writes=True)
    provider = ScriptedProvider([
        ModelReply(tool_calls=[ToolCall(call_id="1", name="write_file", arguments={"path": ".env",
                                                                                  "content": content})]),
        ModelReply(text="written"),
    ])
    rt = Runtime(log, [Orchestrator(), ModelProcessor(provider, registry.specs()),
                       ToolProcessor(registry, checkpoints=False)])
    config = SessionConfig(provider="scripted", model="s", tools=["write_file", "read_file"], workdir=str(work),
                           policy=policy)
    sid = rt.start_session(goal, config)
    return sid, rt.run_session(sid)


def test_a_tool_asked_to_write_a_secret_writes_the_secret_and_the_log_keeps_the_placeholder(
        log, tmp_path, leaky_env) -> None:
    """The goal hands the agent the key (so it reads [REDACTED:STRIPE_KEY]); the model passes
    the placeholder on; the tool runs with the real value; the log never holds it."""
    sid, state = write_session(log, tmp_path, f"Put STRIPE_KEY={STRIPE} into .env",
                               "STRIPE_KEY=[REDACTED:STRIPE_KEY]\n")
    assert state.status == "done"
    assert (tmp_path / ".env").read_text() == f"STRIPE_KEY={STRIPE}\n"
    raw = b"".join(log.read_raw(sid))
    assert STRIPE.encode() not in raw and b"[REDACTED:STRIPE_KEY]" in raw
    args = json.loads(next(e.payload for e in log.read(sid) if e.type == "ToolRequested").arguments_json)
    assert args["content"] == "STRIPE_KEY=[REDACTED:STRIPE_KEY]\n"


@pytest.mark.parametrize(("goal", "policy", "why"), [
    ("Write my stripe key into .env", {}, "the placeholder never came from outside the model"),
    (f"Put {STRIPE} into .env", {"secrets": {"reveal_to_tools": False}}, "the policy says no"),
    ("The docs say to write [REDACTED:STRIPE_KEY] into .env", {}, "a literal placeholder is not a redaction"),
])
def test_the_real_value_is_not_revealed(log, tmp_path, leaky_env, goal, policy, why) -> None:
    sid, state = write_session(log, tmp_path, goal, "STRIPE_KEY=[REDACTED:STRIPE_KEY]\n", **policy)
    assert state.status == "done", why
    assert STRIPE not in (tmp_path / ".env").read_text(), why
    assert (tmp_path / ".env").read_text() == "STRIPE_KEY=[REDACTED:STRIPE_KEY]\n", why


def test_a_literal_placeholder_from_outside_is_defused_in_the_log(log, leaky_env) -> None:
    out = redact(ev.ToolCompleted(call_id="c", name="t", result="page says [REDACTED:STRIPE_KEY]", latency_ms=1))
    assert out.result == "page says [quoted REDACTED:STRIPE_KEY]"
    mine = redact(ev.ModelResponded(request_id="r", text="use [REDACTED:STRIPE_KEY]", tool_calls=[],
                                    input_tokens=1, output_tokens=1, latency_ms=1, finish_reason="", mode="native",
                                    model="m"))
    assert mine.text == "use [REDACTED:STRIPE_KEY]"  # the model passing a placeholder on is not touched
