"""The project file's agents on Kafka workers (a real Tansu broker), as `run --agent` runs them:
the goal intake composes the agent per goal (templated prompt, skills listed, its SessionStart
hook run once and recorded), the tool worker has its MCP server's tools (started with the
worker), `load_skill` and its hooks (a Failure hook too); the definition is recorded in SessionStarted."""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

pytest.importorskip("confluent_kafka", reason="needs confluent-kafka")
pytest.importorskip("mcp", reason="needs the mcp extra")

from loopstream.kafka.log import KafkaLog
from tests.test_kafka_workers import Workers, bus_url, cli

pytestmark = pytest.mark.kafka
SERVER = Path(__file__).parent / "mcp_calc_server.py"
HOOK = """\
import json, pathlib, sys
data = json.load(sys.stdin)
with open(pathlib.Path(__file__).with_suffix(".runs"), "a") as f:
    f.write(data["hook_event_name"] + "\\n")
print(json.dumps(OUTPUT))
"""


def test_a_project_agent_with_a_skill_hooks_and_an_mcp_server_on_workers(kafka_broker: str, tmp_path: Path) -> None:
    (tmp_path / "server.py").write_text(SERVER.read_text())
    skill = tmp_path / ".loopstream" / "skills" / "haiku"
    skill.mkdir(parents=True)
    (skill / "SKILL.md").write_text("---\nname: haiku\ndescription: Answer in a haiku.\n---\nThree lines.\n")
    for point, output in (("SessionStart", {"additional_context": "Team rule: be exact."}),
                          ("PreToolUse", {"decision": "allow"}),
                          ("Spoil", {"decision": "allow", "tool_input": {"a": "six", "b": 7}}),
                          ("Failure", {"additional_context": "the on-call was told"})):
        (tmp_path / f"{point}.py").write_text(HOOK.replace("OUTPUT", repr(output)))
    (tmp_path / "loopstream.toml").write_text(f"""
[agents.m]
provider = "scripted"
system_prompt = "You multiply for the goal: {{goal}}."
tools = []
skills = ["haiku"]
mcp_servers = ["calc"]
[[agents.m.hooks]]
event = "SessionStart"
command = ["{sys.executable}", "SessionStart.py"]
[[agents.m.hooks]]
event = "PreToolUse"
matcher = "calc__*"
command = ["{sys.executable}", "{tmp_path / 'PreToolUse.py'}"]
[agents.f]
provider = "scripted"
tools = []
mcp_servers = ["calc"]
[[agents.f.hooks]]
event = "PreToolUse"
command = ["{sys.executable}", "Spoil.py"]
[[agents.f.hooks]]
event = "Failure"
matcher = "calc__*"
command = ["{sys.executable}", "Failure.py"]
[mcp_servers.calc]
command = ["{sys.executable}", "server.py"]
timeout_s = 60
""")
    prefix = "cp" + uuid.uuid4().hex[:6]
    bus = bus_url(kafka_broker, prefix)
    workers = Workers(bus, tmp_path)
    spec = 'calls:calc__multiply:{"a": 6, "b": 7}'
    for role in ("orchestrator", "model", "tool"):
        workers.start(role, model=spec)
    try:
        for role in ("orchestrator", "model", "tool"):
            workers.wait_ready(role)
        r = cli("submit", "--bus", bus, "--wait", "--timeout", "120", "--agent", "m", "six times seven",
                cwd=tmp_path, timeout=180)
        assert r.returncode == 0, r.stderr + workers.logs()
        assert r.stdout.strip().endswith("42"), r.stdout
        sid = r.stderr.split("session")[-1].split()[0]
        spoiled = cli("submit", "--bus", bus, "--wait", "--timeout", "120", "--agent", "f", "g", cwd=tmp_path,
                      timeout=180)
        assert spoiled.returncode == 0, spoiled.stderr + workers.logs()
        assert "[Failure hook" in spoiled.stdout and "the on-call was told" in spoiled.stdout  # the model read it
        unknown = cli("submit", "--bus", bus, "--wait", "--timeout", "60", "--agent", "nosuch", "g", cwd=tmp_path,
                      timeout=120)
        assert unknown.returncode != 0 and "unknown agent 'nosuch'" in unknown.stdout + unknown.stderr
    finally:
        workers.stop_all()
    with KafkaLog(kafka_broker, topic=f"{prefix}.events") as log:
        events = log.read(sid)
    started = events[0].payload
    assert started.system_prompt.startswith("You multiply for the goal: six times seven.")
    assert "- haiku: Answer in a haiku." in started.system_prompt
    assert started.system_prompt.endswith("Team rule: be exact.")  # the SessionStart hook's note, recorded
    assert started.tools == ["load_skill", "calc__multiply", "calc__explode"]
    definition = json.loads(started.agent_json)
    assert definition["source"] == str(tmp_path / "loopstream.toml") and definition["skills"][0]["name"] == "haiku"
    assert [h["decision"] for h in definition["session_start_hooks"]] == ["allow"]
    done = next(e for e in events if e.type == "ToolCompleted")
    assert (done.payload.name, done.payload.result, done.actor) == ("calc__multiply", "42", "tools")
    assert [e.payload.point for e in events if e.type == "HookDecided"] == ["PreToolUse"]
    assert (tmp_path / "SessionStart.runs").read_text().split() == ["SessionStart"]  # once, by the intake
    assert (tmp_path / "PreToolUse.runs").read_text().split() == ["PreToolUse"]
    assert (tmp_path / "Failure.runs").read_text().split() == ["Failure"]  # on the tool worker, once
