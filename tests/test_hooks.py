"""Hooks as real executables and Python callables: PreToolUse allows, denies, asks or rewrites;
PostToolUse adds a note; each decision is a HookDecided event, and a replay, a fork that redoes
the call, or a resume reads it from the log and never runs the hook again."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loopstream.core.log import LogError
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.processors.hooks import HookFailed, parse
from tests.helpers import wait_for
from tests.test_project_file import cli

HOOK = """\
#!/usr/bin/env python3
import json, pathlib, sys, time
data = json.load(sys.stdin)
with open(pathlib.Path(__file__).with_suffix(".runs"), "a") as f:
    f.write(data["hook_event_name"] + "\\n")
a = data["tool_input"]
MODE
"""
MODES = {
    "rewrite": 'print(json.dumps({"decision": "allow", "tool_input": {"a": a["a"] * 10, "b": a["b"]}, '
               '"reason": "scaled"}))',
    "deny": 'print(json.dumps({"decision": "deny", "reason": "13 is unlucky"}))',
    "exit2": 'sys.stderr.write("no adding today"); sys.exit(2)',
    "crash": 'sys.stderr.write("boom"); sys.exit(3)',
    "slow": "time.sleep(5)",
    "garbage": 'print("<not json>")',
    "note": 'print(json.dumps({"additional_context": "checked by the auditor"}))',
    "ask": 'print(json.dumps({"hookSpecificOutput": {"permissionDecision": "ask", '
           '"permissionDecisionReason": "big numbers"}}))',
}


def setup(tmp_path: Path, hooks: list[tuple[str, str, str]]) -> Path:
    """A project whose agent `a` has the hooks (event, mode, extra TOML) as real executables."""
    toml = '[agents.a]\nprovider = "scripted"\ntools = ["add"]\n'
    for i, (event, mode, extra) in enumerate(hooks):
        script = tmp_path / f"hook{i}.py"
        script.write_text(HOOK.replace("MODE", MODES[mode]))
        script.chmod(0o755)
        toml += f'[[agents.a.hooks]]\nevent = "{event}"\ncommand = ["{script}"]\n{extra}\n'
    (tmp_path / "loopstream.toml").write_text(toml)
    return tmp_path


def runs(tmp_path: Path, i: int = 0) -> list[str]:
    path = tmp_path / f"hook{i}.runs"
    return path.read_text().split() if path.exists() else []


def run(tmp_path: Path, a: int = 2, b: int = 3, *extra: str):
    r = cli("run", "--agent", "a", "--model", f'calls:add:{{"a": {a}, "b": {b}}}', "--db", "x.db", *extra, "g",
            cwd=tmp_path)
    log = SQLiteLog(tmp_path / "x.db")
    sid = log.sessions()[-1].session_id if log.sessions() else None
    return r, log, sid


def test_pre_tool_use_rewrites_the_arguments_and_replay_does_not_run_it(tmp_path: Path) -> None:
    setup(tmp_path, [("PreToolUse", "rewrite", 'matcher = "ad*"')])
    r, log, sid = run(tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "23"  # add(20, 3): the hook's arguments
    types = [e.type for e in log.read(sid)]
    assert types[4:7] == ["ToolRequested", "HookDecided", "ToolCompleted"]
    hook = log.read(sid)[5].payload
    assert (hook.point, hook.decision, hook.reason, json.loads(hook.arguments_json)) == (
        "PreToolUse", "allow", "scaled", {"a": 20, "b": 3})
    assert runs(tmp_path) == ["PreToolUse"]
    assert cli("replay", sid, "--db", "x.db", cwd=tmp_path).returncode == 0
    checked = cli("replay", sid, "--check", "--db", "x.db", cwd=tmp_path)  # the determinism check re-drives it
    assert checked.returncode == 0 and "no divergence" in checked.stdout, checked.stdout + checked.stderr
    assert runs(tmp_path) == ["PreToolUse"]  # the replay read the decision
    # A fork from the decision redoes the call: with the recorded arguments, the hook not run again.
    forked = cli("fork", sid, "--at", "5", "--db", "x.db", cwd=tmp_path)
    assert forked.returncode == 0, forked.stderr
    child = [s.session_id for s in log.sessions() if s.session_id != sid][0]
    resumed = cli("resume", child, "--db", "x.db", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == "23" and runs(tmp_path) == ["PreToolUse"]


@pytest.mark.parametrize(("mode", "extra", "kind", "message"), [
    ("deny", "", "hook_denied", "13 is unlucky"),
    ("exit2", "", "hook_denied", "no adding today"),
    ("crash", "", "hook_denied", "failed: exit status 3: boom"),
    ("slow", "timeout_s = 0.5", "hook_denied", "did not answer within 0.5s"),
    ("garbage", "", "hook_denied", "output is not JSON"),
])
def test_pre_tool_use_denies_and_failures_deny_by_default(tmp_path: Path, mode: str, extra: str, kind: str,
                                                          message: str) -> None:
    setup(tmp_path, [("PreToolUse", mode, extra)])
    r, log, sid = run(tmp_path, 13)
    assert r.returncode == 0, r.stderr
    events = log.read(sid)
    failed = next(e.payload for e in events if e.type == "ToolFailed")
    assert failed.error_kind == kind and message in failed.message
    assert message in r.stdout  # the model was told why
    decided = next(e.payload for e in events if e.type == "HookDecided")
    assert decided.decision == "deny" and message in decided.reason


def test_a_failing_hook_per_its_policy_allow_or_stop(tmp_path: Path) -> None:
    setup(tmp_path, [("PreToolUse", "crash", 'on_error = "allow"')])
    r, log, sid = run(tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "5"
    assert next(e.payload for e in log.read(sid) if e.type == "HookDecided").decision == "error"
    setup(tmp_path, [("PreToolUse", "crash", 'on_error = "stop"')])
    r, log, sid = run(tmp_path)
    assert r.returncode == 1 and "hook" in r.stderr
    assert [e.type for e in log.read(sid)][-2:] == ["HookDecided", "SessionFailed"]


def test_post_tool_use_adds_a_note_recorded_with_the_result(tmp_path: Path) -> None:
    setup(tmp_path, [("PostToolUse", "note", ""), ("PreToolUse", "rewrite", 'matcher = "other"')])
    r, log, sid = run(tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "5\n[PostToolUse hook " + str(tmp_path / "hook0.py") + ": checked by the auditor]"
    types = [e.type for e in log.read(sid)]
    assert types[4:7] == ["ToolRequested", "HookDecided", "ToolCompleted"]
    assert runs(tmp_path) == ["PostToolUse"] and runs(tmp_path, 1) == []  # the matcher kept it out
    cli("replay", sid, "--db", "x.db", cwd=tmp_path)
    assert runs(tmp_path) == ["PostToolUse"]


def test_pre_tool_use_ask_waits_for_a_person(tmp_path: Path) -> None:
    setup(tmp_path, [("PreToolUse", "ask", "")])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPSTREAM_", "OPENAI_", "ANTHROPIC_"))}
    env["LOOPSTREAM_CONFIG_DIR"] = str(tmp_path / "none")
    proc = subprocess.Popen([sys.executable, "-m", "loopstream.cli.app", "run", "--agent", "a", "--model",
                             'calls:add:{"a": 2, "b": 3}', "--db", "x.db", "-q", "g"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def asked():
            if not (tmp_path / "x.db").exists():
                return None
            try:
                log = SQLiteLog(tmp_path / "x.db", readonly=True)
                sessions = log.sessions()
            except LogError:  # not created yet
                return None
            events = log.read(sessions[0].session_id) if sessions else []
            return events if events and events[-1].type == "ApprovalRequested" else None
        events = wait_for(asked, 60)
        assert events is not None
        assert [e.type for e in events][-2:] == ["HookDecided", "ApprovalRequested"]
        assert "a hook asks: big numbers" in events[-1].payload.reason
        sid, call = events[-1].session_id, events[-1].payload.call_id
        assert cli("deny", sid, call, "--reason", "no", "--db", "x.db", cwd=tmp_path).returncode == 0
        out, err = proc.communicate(timeout=60)
        assert "denied" in out and "waiting for approval" in err
    finally:
        proc.kill()


def test_python_callable_hook(tmp_path: Path) -> None:
    (tmp_path / "myhooks.py").write_text(textwrap.dedent("""
        def guard(data):
            if data["tool_input"]["a"] > 100:
                return {"decision": "deny", "reason": "too big for " + data["tool_name"]}
            return None
    """))
    (tmp_path / "loopstream.toml").write_text('[agents.a]\nprovider = "scripted"\ntools = ["add"]\n'
                                              '[[agents.a.hooks]]\nevent = "PreToolUse"\npython = "myhooks:guard"\n')
    r = cli("run", "--agent", "a", "--model", 'calls:add:{"a": 101, "b": 1}', "--db", "x.db", "g", cwd=tmp_path,
            env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0 and "too big for add" in r.stdout


@pytest.mark.parametrize(("raw", "decision"), [
    (None, "allow"), ({}, "allow"), ({"decision": "block", "reason": "r"}, "deny"),
    ({"decision": "approve"}, "allow"), ({"permissionDecision": "deny"}, "deny"),
])
def test_decision_shapes(raw, decision) -> None:
    assert parse(raw).decision == decision


@pytest.mark.parametrize("raw", [[1], "x", {"decision": "maybe"}, {"tool_input": "a=1"}])
def test_bad_decisions_are_failures(raw) -> None:
    with pytest.raises(HookFailed):
        parse(raw)


START = """\
#!/usr/bin/env python3
import json, pathlib, sys
data = json.load(sys.stdin)
with open(pathlib.Path(__file__).with_suffix(".runs"), "a") as f:
    f.write(data["hook_event_name"] + "\\n")
if "forbidden" in data["goal"]:
    print(json.dumps({"decision": "deny", "reason": "not on this project"}))
else:
    print(json.dumps({"additional_context": "The team's style guide: answer in one line."}))
"""


def test_session_start_hook_adds_context_recorded_in_session_started_or_refuses(tmp_path: Path) -> None:
    script = tmp_path / "hook0.py"
    script.write_text(START)
    script.chmod(0o755)
    (tmp_path / "loopstream.toml").write_text('[agents.a]\nprovider = "scripted"\ntools = ["add"]\n'
                                              f'[[agents.a.hooks]]\nevent = "SessionStart"\ncommand = ["{script}"]\n')
    r = cli("run", "--agent", "a", "--db", "x.db", "add", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    log = SQLiteLog(tmp_path / "x.db")
    sid = log.sessions()[0].session_id
    started = log.read(sid, 0, 0)[0].payload
    assert started.system_prompt.endswith("The team's style guide: answer in one line.")
    (record,) = json.loads(started.agent_json)["session_start_hooks"]
    assert record["decision"] == "allow" and record["hook"] == str(script)
    assert cli("replay", sid, "--db", "x.db", cwd=tmp_path).returncode == 0
    assert runs(tmp_path) == ["SessionStart"]  # replay read it from SessionStarted
    refused = cli("run", "--agent", "a", "--db", "x.db", "forbidden goal", cwd=tmp_path)
    assert refused.returncode == 2 and "refused the session: not on this project" in refused.stderr
    assert len(log.sessions()) == 1  # nothing written


def test_hostile_hook_output(tmp_path: Path) -> None:
    """Huge output, a lone surrogate in a reason, markup: a failure or text, never a crash."""
    from loopstream.core import events as ev
    from loopstream.core.codec import decode, encode
    from loopstream.core.policy import Hook
    from loopstream.processors.hooks import run_hook
    from tests.helpers import make_event

    huge = tmp_path / "huge.py"
    huge.write_text("import sys\nsys.stdout.write('{\"reason\": \"' + 'x' * 200000 + '\"}')\n")
    decision, _ = run_hook(Hook(event="PreToolUse", command=[sys.executable, str(huge)]), {}, str(tmp_path))
    assert decision.decision == "deny" and "not JSON" in decision.reason  # cut at 64 KB: no longer JSON
    (tmp_path / "weird.py").write_text("def hook(data):\n    return {'decision': 'deny', "
                                       "'reason': '[bold]x[/bold] \\udcff <script>'}\n")
    sys.path.insert(0, str(tmp_path))
    try:
        decision, _ = run_hook(Hook(event="PreToolUse", python="weird:hook"), {}, str(tmp_path))
    finally:
        sys.path.remove(str(tmp_path))
    assert decision.decision == "deny"
    hook = Hook(event="PreToolUse", python="weird:hook")
    event = make_event(decision.event(hook, "c1", 1), seq=5)
    from loopstream.core.secrets import sanitize
    event = event.model_copy(update={"payload": sanitize(event.payload, ())})
    assert isinstance(decode(encode(event)).payload, ev.HookDecided)
    missing = run_hook(Hook(event="PreToolUse", python="no_such_module_x:hook"), {}, ".")[0]
    assert missing.decision == "deny" and "cannot import" in missing.reason
