"""The project file (loopstream.toml): found upward, merged over the user file, strictly
validated (one line naming file, key and reason), its agent recorded in SessionStarted v3."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastavro import schemaless_writer

from loopstream.agents.definition import render
from loopstream.agents.project import ProjectError, load_project
from loopstream.core import codec
from loopstream.core import events as ev
from loopstream.core.codec import decode, encode
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from tests.helpers import make_event

AGENT = """
[agents.adder]
description = "adds numbers"
provider = "scripted"
model = "adder"
prompt_file = "prompts/adder.md"
tools = ["add"]
max_steps = 5

[agents.adder.sampling]
temperature = 0.0

[agents.adder.policy.budgets]
max_tokens = 5000
"""


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPSTREAM_", "OPENAI_", "ANTHROPIC_"))}
    full_env.update({"LOOPSTREAM_CONFIG_DIR": str(cwd / ".no-user-config")}, **(env or {}))
    return subprocess.run([sys.executable, "-m", "loopstream.cli.app", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=120)


def project(tmp_path: Path, text: str = AGENT, prompt: str = "You add. Goal: {goal} on {date} in {workdir}; {x}") -> Path:
    (tmp_path / "prompts").mkdir(parents=True, exist_ok=True)
    (tmp_path / "prompts" / "adder.md").write_text(prompt)
    (tmp_path / "loopstream.toml").write_text(text)
    return tmp_path


def test_run_agent_found_upward_records_its_definition(tmp_path: Path) -> None:
    root = project(tmp_path)
    sub = root / "deep" / "er"
    sub.mkdir(parents=True)
    r = cli("run", "--agent", "adder", "--db", str(root / "x.db"), "add 2 and 3", cwd=sub)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "The result is 1."
    log = SQLiteLog(root / "x.db")
    sid = log.sessions()[0].session_id
    started = log.read(sid, 0, 0)[0]
    assert started.schema_version == 4
    p = started.payload
    assert (p.agent, p.provider, p.tools, p.max_steps) == ("adder", "scripted", ["add"], 5)
    assert p.system_prompt.startswith("You add. Goal: add 2 and 3 on 20") and f"in {sub.resolve()}; {{x}}" in p.system_prompt
    definition = json.loads(p.agent_json)
    assert definition["name"] == "adder" and definition["source"] == str(root / "loopstream.toml")
    assert definition["spec"]["prompt_file"] == "prompts/adder.md" and len(definition["prompt_sha256"]) == 64
    assert json.loads(p.config_json)["budgets"] == {"max_tokens": 5000}
    assert fold(log.read(sid)).agent_json == p.agent_json


def test_agents_lists_them(tmp_path: Path) -> None:
    r = cli("agents", cwd=project(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "adder" in r.stdout and "adds numbers" in r.stdout and "scripted:adder" in r.stdout


def test_project_file_wins_over_user_file(tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "loopstream.toml").write_text('[agents.adder]\nmodel = "user-model"\ndescription = "mine"\n'
                                          '[agents.helper]\ndescription = "only in the user file"\n')
    root = project(tmp_path / "proj")
    loaded = load_project(root, user=user / "loopstream.toml")
    assert loaded.agents["adder"].spec.model == "adder"  # the project's, whole
    assert loaded.agents["adder"].spec.description == "adds numbers"
    assert loaded.agents["helper"].source == user / "loopstream.toml"
    assert loaded.files == [user / "loopstream.toml", root / "loopstream.toml"]


def test_templating_leaves_other_braces() -> None:
    assert render("{goal}|{date}|{workdir}|{x}|{{goal}}|{ goal }", "G", "/w", "2026-01-02") == \
        "G|2026-01-02|/w|{x}|{G}|{ goal }"


@pytest.mark.parametrize(("text", "message"), [
    ('[agents.a]\nmodle = "x"\n', "loopstream.toml: agents.a.modle: unknown key; did you mean 'model'?"),
    ('[agents.a]\nmax_steps = "5"\n', "loopstream.toml: agents.a.max_steps: expected an integer, got '5'"),
    ('[agents.a]\ntools = "add"\n', "loopstream.toml: agents.a.tools: expected an array, got 'add'"),
    ('[agent.a]\nmodel = "x"\n', "loopstream.toml: agent: unknown key; did you mean 'agents'?"),
    ('[agents.a\n', "loopstream.toml: not valid TOML: "),
    ('[agents.a]\nprompt_file = "nope.md"\n', "loopstream.toml: agents.a.prompt_file: no such file "),
    ('[agents.a]\nprompt_file = "../outside.md"\n', "loopstream.toml: agents.a.prompt_file: ../outside.md resolves to "),
    ('[agents.a]\nsystem_prompt = "x"\nprompt_file = "p.md"\n', "loopstream.toml: agents.a: give `system_prompt` or "),
    ('[agents.a]\nmcp_servers = ["calc"]\n', "loopstream.toml: agents.a.mcp_servers: no [mcp_servers.calc] in "),
    ('[agents.a]\nsub_agents = ["ghost"]\n', "loopstream.toml: agents.a.sub_agents: unknown agent(s) 'ghost'"),
    ('[agents.a.policy.budgets]\nmax_tokenz = 5\n', "agents.a.policy: budgets.max_tokenz: unknown key; did you mean"),
    ('[[agents.a.hooks]]\nevent = "PreToolUse"\n', "agents.a.hooks[0]: a hook needs exactly one of `command`"),
    ('[agents.a.sampling]\ntemperature = 9\n', "agents.a.sampling"),
    ('[mcp_servers.calc]\ncommand = ["x"]\nurl = "http://127.0.0.1:1/mcp"\n', "mcp_servers.calc: an MCP server needs"),
])
def test_bad_project_files_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "outside.md").write_text("secret")
    (work / "loopstream.toml").write_text(text)
    with pytest.raises(ProjectError) as caught:
        load_project(work, user=tmp_path / "none.toml")
    assert message in str(caught.value) and "\n" not in str(caught.value)
    if "modle" not in text and "[agents.a\n" != text:
        return  # the command line's way of printing it: checked on two (a process each is slow)
    r = cli("run", "--agent", "a", "--provider", "scripted", "goal", cwd=work)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_prompt_file_symlink_out_of_the_project_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("top secret")
    work = tmp_path / "work"
    work.mkdir()
    (work / "p.md").symlink_to(tmp_path / "secret.txt")
    (work / "loopstream.toml").write_text('[agents.a]\nprompt_file = "p.md"\n')
    with pytest.raises(ProjectError, match=r"agents\.a\.prompt_file: p\.md resolves to .*outside the project folder"):
        load_project(work, user=tmp_path / "none.toml")


def test_unknown_agent_names_the_known_ones(tmp_path: Path) -> None:
    r = cli("run", "--agent", "ghost", "g", cwd=project(tmp_path))
    assert r.returncode == 2 and "unknown agent 'ghost'" in r.stderr and "known: adder" in r.stderr


def test_hostile_prompt_file_not_utf8_and_huge(tmp_path: Path) -> None:
    work = project(tmp_path, prompt="x")
    (work / "prompts" / "adder.md").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ProjectError, match="not UTF-8"):
        load_project(work, user=tmp_path / "none.toml")
    (work / "prompts" / "adder.md").write_bytes(b"x" * 300_000)
    with pytest.raises(ProjectError, match="larger than"):
        load_project(work, user=tmp_path / "none.toml")


def v2_session_started() -> bytes:
    """A SessionStarted as the code before v3 wrote it: v2 bytes, schema_version 2."""
    fields = dict(agent="old", provider="scripted", model="m", system_prompt="", tools=["add"], max_steps=5,
                  workdir=".", config_json="{}", temperature=0.0, max_output_tokens=1024, stop=[], top_p=None,
                  seed=None)
    payload = io.BytesIO()
    schemaless_writer(payload, codec.REGISTRY.versions["SessionStarted"][2], fields)
    event = decode(encode(make_event(ev.SessionStarted(**fields), seq=0)))
    envelope = {**event.model_dump(exclude={"payload", "chain_hash"}), "schema_version": 2,
                "payload": payload.getvalue()}
    out = io.BytesIO()
    schemaless_writer(out, codec.REGISTRY.envelope_body, envelope)
    return out.getvalue() + b"\x00"


def test_a_v2_session_started_is_upcast_to_a_flags_definition() -> None:
    event = decode(v2_session_started())
    assert event.schema_version == 4
    assert json.loads(event.payload.agent_json) == {"name": "old", "source": "flags"}
    assert event.payload.temperature == 0.0


def test_project_file_with_a_lone_surrogate_or_binary_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "loopstream.toml").write_bytes(b'[agents.a]\ndescription = "\xed\xa0\x80"\n')
    with pytest.raises(ProjectError, match=r"loopstream.toml: not UTF-8 text \(line 2, byte 26"):
        load_project(tmp_path, user=tmp_path / "none.toml")
    (tmp_path / "loopstream.toml").write_text('[agents.a]\ndescription = "[red]markup[/red] \\u202e"\n')
    assert load_project(tmp_path, user=tmp_path / "none.toml").agents["a"].spec.description.startswith("[red]")


def test_flags_that_the_agent_sets_are_refused_budgets_apply_over_it(tmp_path: Path) -> None:
    root = project(tmp_path)
    r = cli("run", "--agent", "adder", "--tools", "add", "--temperature", "1", "g", cwd=root)
    assert r.returncode == 2 and "--tools, --temperature: set by the agent's definition" in r.stderr
    r = cli("run", "--agent", "adder", "--max-tokens", "5", "--db", "x.db", "g", cwd=root)
    assert r.returncode == 1 and "token budget exceeded" in r.stderr
