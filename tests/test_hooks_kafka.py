"""A PreToolUse and a PostToolUse hook applied the same on a Kafka worker (a real Tansu broker):
the hooks come with the recorded policy, the worker's tool processor runs them once and records
each decision as a HookDecided event."""
from __future__ import annotations

import json
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("confluent_kafka", reason="needs confluent-kafka")

from loopstream.kafka.log import KafkaLog
from tests.helpers import wait_for
from tests.test_hooks import HOOK, MODES, runs
from tests.test_kafka_workers import Workers, bus_url, cli

pytestmark = pytest.mark.kafka


def test_hooks_on_a_kafka_worker(kafka_broker: str, tmp_path: Path) -> None:
    hooks = []
    # the PostToolUse hook allows with no note: the scripted adder parses the result as a number
    for i, (event, mode) in enumerate([("PreToolUse", "rewrite"), ("PostToolUse", "rewrite")]):
        script = tmp_path / f"hook{i}.py"
        script.write_text(HOOK.replace("MODE", MODES[mode]))
        script.chmod(0o755)
        hooks.append({"event": event, "command": [str(script)]})
    (tmp_path / "agents.json").write_text(json.dumps({"hooked": {"tools": ["add"], "policy": {"hooks": hooks}}}))
    prefix = "hk" + uuid.uuid4().hex[:6]
    bus = bus_url(kafka_broker, prefix)
    workers = Workers(bus, tmp_path)
    workers.start("all", "--agents", str(tmp_path / "agents.json"), model="adder:1")
    try:
        workers.wait_ready("all")
        r = cli("submit", "--bus", bus, "--wait", "--timeout", "120", "--agent", "hooked", "add", cwd=tmp_path,
                timeout=180)
        assert r.returncode == 0, r.stderr + workers.logs()
        # adder:1 calls add(0, 1); the PreToolUse hook made it add(0, 1) with a * 10 = 0: result 1
        assert "The result is 1." in r.stdout
        sid = r.stderr.split("session")[-1].split()[0]
    finally:
        workers.stop_all()
    with KafkaLog(kafka_broker, topic=f"{prefix}.events") as log:
        events = log.read(sid)
    types = [e.type for e in events]
    assert types.count("HookDecided") == 2, types
    decided = [e.payload for e in events if e.type == "HookDecided"]
    assert [d.point for d in decided] == ["PreToolUse", "PostToolUse"]
    assert json.loads(decided[0].arguments_json) == {"a": 0, "b": 1}
    assert decided[1].decision == "allow" and decided[1].arguments_json is None
    assert runs(tmp_path, 0) == ["PreToolUse"] and runs(tmp_path, 1) == ["PostToolUse"]  # once each


POINT = """\
import json, pathlib, sys
data = json.load(sys.stdin)
with open(pathlib.Path(__file__).with_suffix(".runs"), "a") as f:
    f.write(data["hook_event_name"] + "\\n")
print(json.dumps(OUTPUT))
"""


def test_every_hook_point_on_kafka_workers_per_role(kafka_broker: str, tmp_path: Path) -> None:
    """PreModelCall and PostModelCall on the model worker, PreCompact on it too (compaction is the
    model role's), PermissionRequest on the tool worker, SessionEnd on the tool worker once the
    session ended: each decision an event, each hook run exactly once per decision."""
    outputs = {"PreModelCall": {"additional_context": "be brief"}, "PostModelCall": {},
               "PreCompact": {"additional_context": "keep the numbers"}, "PermissionRequest": {"decision": "allow"},
               "SessionEnd": {}}
    hooks = []
    for point, output in outputs.items():
        script = tmp_path / f"{point}.py"
        script.write_text(POINT.replace("OUTPUT", repr(output)))
        hooks.append({"event": point, "command": [sys.executable, str(script)]})
    policy = {"hooks": hooks, "permissions": {"default": "allow", "rules": [{"tool": "add", "action": "ask"}]},
              "compaction": {"context_budget_tokens": 300}}
    (tmp_path / "agents.json").write_text(json.dumps({"hooked": {"tools": ["add"], "max_steps": 20,
                                                                 "policy": policy}}))
    prefix = "hp" + uuid.uuid4().hex[:6]
    bus = bus_url(kafka_broker, prefix)
    workers = Workers(bus, tmp_path)
    for role in ("orchestrator", "model", "tool"):
        workers.start(role, "--agents", str(tmp_path / "agents.json"), model="adder:6")
    try:
        for role in ("orchestrator", "model", "tool"):
            workers.wait_ready(role)
        r = cli("submit", "--bus", bus, "--wait", "--timeout", "120", "--agent", "hooked", "count", cwd=tmp_path,
                timeout=180)
        assert r.returncode == 0, r.stderr + workers.logs()
        assert "The result is 6." in r.stdout
        sid = r.stderr.split("session")[-1].split()[0]
        with KafkaLog(kafka_broker, topic=f"{prefix}.events") as log:
            events = wait_for(lambda: (es := log.read(sid)) and es[-1].type == "HookDecided" and es, 60)
    finally:
        workers.stop_all()
    assert events, workers.logs()
    decided = Counter(e.payload.point for e in events if e.type == "HookDecided")
    assert set(decided) == set(outputs), decided
    assert decided["PreModelCall"] == decided["PostModelCall"] == 7 and decided["PermissionRequest"] == 6
    assert decided["SessionEnd"] == 1 and events[-2].type == "SessionFinished"
    for point in outputs:  # once per decision: no redelivery or other worker ran one again
        assert Counter((tmp_path / f"{point}.runs").read_text().split())[point] == decided[point], point
    actors = {e.payload.point: e.actor for e in events if e.type == "HookDecided"}
    assert actors == {"PreModelCall": "model", "PostModelCall": "model", "PreCompact": "compaction",
                      "PermissionRequest": "tools", "SessionEnd": "hooks"}
    assert "ApprovalRequested" not in [e.type for e in events]  # the hook approved every call
