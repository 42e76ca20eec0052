"""A test per hook point (processors/hooks.py): each hook is a real executable that counts its runs
in a marker file; its decision is a HookDecided event and is applied; a replay and the
determinism check read it and never run the hook; a redo from the log (a fork at the decision,
a restarted driver) goes on from it without running the hook again.

Invariant checked for every point: the hook ran exactly as many times as HookDecided events were
made by a processor (not copied by a fork) in the sessions of the log."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loopstream.core.sqlite_log import SQLiteLog
from loopstream.providers.base import ModelReply
from loopstream.providers.scripted import ScriptedProvider, adder_script, scripted_from_spec
from loopstream.replay.determinism import check_determinism
from loopstream.replay.fork import fork
from loopstream.replay.replayer import replay
from loopstream.runtime.assembly import build_runtime, processors_for
from loopstream.runtime.inline import Runtime, SessionConfig
from tests.test_project_file import cli

HOOK = """\
import json, pathlib, sys
data = json.load(sys.stdin)
with open(pathlib.Path(__file__).with_suffix(".runs"), "a") as f:
    f.write(data["hook_event_name"] + "\\n")
print(json.dumps(OUTPUT))
"""


def hook(tmp_path: Path, point: str, output: dict, **extra) -> dict:
    script = tmp_path / f"{point}.py"
    script.write_text(HOOK.replace("OUTPUT", repr(output)))
    return {"event": point, "command": [sys.executable, str(script)], **extra}


def runs(tmp_path: Path, point: str) -> int:
    path = tmp_path / f"{point}.runs"
    return len(path.read_text().split()) if path.exists() else 0


def start(tmp_path: Path, provider, hooks: list[dict], goal: str = "add", runtime: Runtime | None = None,
          max_steps: int = 12, **policy):
    log = SQLiteLog(tmp_path / "h.db")
    rt = runtime or build_runtime(log, provider)
    config = SessionConfig(provider="scripted", model=provider.model, tools=["add"], workdir=str(tmp_path),
                           max_steps=max_steps, policy={"hooks": hooks, **policy})
    state = rt.run_session(rt.start_session(goal, config))
    return log, state


def decided(events, point: str) -> list:
    return [e for e in events if e.type == "HookDecided" and e.payload.point == point]


def made_here(log: SQLiteLog, point: str) -> int:
    """HookDecided events at `point` a processor made (a fork child's copied prefix excluded)."""
    n = 0
    for s in log.sessions():
        events = log.read(s.session_id)
        forked = next((e.seq for e in events if e.type == "SessionForked"), -1)
        n += sum(1 for e in decided(events, point) if e.seq > forked)
    return n


def replays_without_running(tmp_path: Path, log: SQLiteLog, sid: str, point: str) -> None:
    before = runs(tmp_path, point)
    assert before == made_here(log, point) > 0
    assert check_determinism(log, sid).ok, check_determinism(log, sid).render()
    replay(log, sid)
    assert runs(tmp_path, point) == before  # read from the log, never run


def test_pre_model_call_note_joins_the_conversation_and_a_fork_at_it_does_not_run_it(tmp_path: Path) -> None:
    log, state = start(tmp_path, scripted_from_spec("adder:1"), [hook(tmp_path, "PreModelCall",
                                                                      {"additional_context": "be brief"})])
    assert state.status == "done"
    events = log.read(state.session_id)
    pre = decided(events, "PreModelCall")
    assert len(pre) == 2 and [events[e.seq - 1].type for e in pre] == ["ModelRequested"] * 2
    assert events[pre[0].seq + 1].type == "ModelResponded"  # the model was called after the decision
    assert sum("[PreModelCall hook" in m.content and "be brief" in m.content for m in state.messages) == 2
    replays_without_running(tmp_path, log, state.session_id, "PreModelCall")
    # a fork at the first decision redoes the model call from it: the hook is not run for that call
    child = fork(log, state.session_id, pre[0].seq).child_session_id
    assert build_runtime(log, scripted_from_spec("adder:1")).run_session(child).status == "done"
    assert runs(tmp_path, "PreModelCall") == made_here(log, "PreModelCall") == 3  # 2 + the child's 2nd call


def test_pre_model_call_deny_stops_the_session(tmp_path: Path) -> None:
    log, state = start(tmp_path, scripted_from_spec("adder:1"),
                       [hook(tmp_path, "PreModelCall", {"decision": "deny", "reason": "out of hours"})])
    assert state.status == "failed" and "out of hours" in state.error
    types = [e.type for e in log.read(state.session_id)]
    assert types[-3:] == ["ModelRequested", "HookDecided", "SessionFailed"] and "ModelResponded" not in types
    replays_without_running(tmp_path, log, state.session_id, "PreModelCall")


def test_post_model_call_is_recorded_with_the_reply(tmp_path: Path) -> None:
    log, state = start(tmp_path, scripted_from_spec("adder:1"),
                       [hook(tmp_path, "PostModelCall", {"additional_context": "logged"})])
    assert state.status == "done"
    events = log.read(state.session_id)
    post = decided(events, "PostModelCall")
    assert len(post) == 2 and all(events[e.seq - 1].type == "ModelResponded" for e in post)
    assert post[0].payload.context == "logged" and post[0].causation_id == events[post[0].seq - 1].causation_id
    replays_without_running(tmp_path, log, state.session_id, "PostModelCall")
    stopped_at = tmp_path / "stop"
    stopped_at.mkdir()
    log2, failed = start(stopped_at, scripted_from_spec("adder:1"),
                         [hook(stopped_at, "PostModelCall", {"decision": "deny", "reason": "leaked a secret"})])
    assert failed.status == "failed" and "leaked a secret" in failed.error


def test_pre_compact_instructions_reach_the_summarizer(tmp_path: Path) -> None:
    prompts: list[str] = []
    inner = adder_script(12)

    def script(messages):
        if messages and messages[0].content.startswith("You compress"):
            prompts.append(messages[0].content)
            return ModelReply(text="Counted with add; the latest result is in the recent turns.")
        return inner(messages)

    log, state = start(tmp_path, ScriptedProvider(script, model="counter"),
                       [hook(tmp_path, "PreCompact", {"additional_context": "keep every number"})],
                       goal="count", max_steps=20, compaction={"context_budget_tokens": 300})
    assert state.status == "done", state.error
    events = log.read(state.session_id)
    pre = decided(events, "PreCompact")
    compacted = [e for e in events if e.type == "ContextCompacted"]
    assert pre and len(pre) == len(compacted) and prompts
    assert all(events[e.seq - 1].type == "CompactionRequested" for e in pre)
    assert all(p.endswith("Also: keep every number") for p in prompts)
    replays_without_running(tmp_path, log, state.session_id, "PreCompact")
    child = fork(log, state.session_id, pre[0].seq).child_session_id  # the summary is redone, not the hook
    assert build_runtime(log, ScriptedProvider(script, model="counter")).run_session(child).status == "done"
    assert runs(tmp_path, "PreCompact") == made_here(log, "PreCompact")


ASK = {"default": "allow", "rules": [{"tool": "add", "action": "ask"}]}


@pytest.mark.parametrize(("output", "outcome"), [
    ({"decision": "allow"}, "ToolCompleted"),
    ({"hookSpecificOutput": {"decision": {"behavior": "deny", "message": "not on Fridays"}}}, "ToolFailed"),
    ({}, "ApprovalRequested"),  # silence: a person decides
])
def test_permission_request_approves_denies_or_leaves_it_to_a_person(tmp_path: Path, output: dict,
                                                                      outcome: str) -> None:
    log, state = start(tmp_path, scripted_from_spec('calls:add:{"a": 40, "b": 2}'),
                       [hook(tmp_path, "PermissionRequest", output)], permissions=ASK)
    events = log.read(state.session_id)
    (perm,) = decided(events, "PermissionRequest")
    assert events[perm.seq - 1].type == "ToolRequested" and events[perm.seq + 1].type == outcome
    if outcome == "ToolCompleted":
        assert state.status == "done" and state.answer.strip() == "42"
    elif outcome == "ToolFailed":
        assert "not on Fridays" in events[perm.seq + 1].payload.message
        assert events[perm.seq + 1].payload.error_kind == "hook_denied"
    else:
        assert state.status == "awaiting_approval"
    replays_without_running(tmp_path, log, state.session_id, "PermissionRequest")
    assert Runtime(log, processors_for("all")).run_session(state.session_id).status == state.status
    assert runs(tmp_path, "PermissionRequest") == 1


def test_failure_hook_on_a_model_call_stops_the_retries(tmp_path: Path) -> None:
    log, state = start(tmp_path, scripted_from_spec("down"),
                       [hook(tmp_path, "Failure", {"decision": "deny", "reason": "paged the on-call"},
                             matcher="model")], retries={"base_ms": 1, "max_ms": 2})
    assert state.status == "failed" and "paged the on-call" in state.error
    types = [e.type for e in log.read(state.session_id)]
    assert types[-4:] == ["ModelRequested", "HookDecided", "ModelFailed", "SessionFailed"]
    assert "RetryScheduled" not in types
    replays_without_running(tmp_path, log, state.session_id, "Failure")


def test_failure_hook_on_a_tool_call_adds_a_note(tmp_path: Path) -> None:
    log, state = start(tmp_path, scripted_from_spec('calls:add:{"a": "x", "b": 2}'),
                       [hook(tmp_path, "Failure", {"additional_context": "a is not a number"}, matcher="add")])
    events = log.read(state.session_id)
    (failure,) = decided(events, "Failure")
    failed = events[failure.seq + 1].payload
    assert events[failure.seq + 1].type == "ToolFailed" and "[Failure hook" in failed.message
    assert "a is not a number" in failed.message
    replays_without_running(tmp_path, log, state.session_id, "Failure")


def test_session_end_runs_once_after_the_end_even_after_a_restart(tmp_path: Path) -> None:
    end = [hook(tmp_path, "SessionEnd", {"additional_context": "archived"})]
    provider = scripted_from_spec("adder:1")
    log = SQLiteLog(tmp_path / "h.db")
    # A driver that stops right after the end (as if it crashed): the hooks are owed, not run.
    crashed = Runtime(log, [p for p in processors_for("all", provider=provider) if p.name != "hooks"])
    log, state = start(tmp_path, provider, end, runtime=crashed)
    assert state.status == "done" and state.end_hooks_owed and runs(tmp_path, "SessionEnd") == 0
    resumed = cli("resume", state.session_id, "--db", str(tmp_path / "h.db"), cwd=tmp_path)  # runs what is owed
    assert resumed.returncode == 0 and resumed.stdout.strip() == "The result is 1.", resumed.stderr
    restarted = build_runtime(log, provider).run_session(state.session_id)
    assert not restarted.end_hooks_owed and restarted.status == "done"
    events = log.read(state.session_id)
    assert [e.type for e in events][-2:] == ["SessionFinished", "HookDecided"]
    assert events[-1].causation_id == events[-2].event_id and events[-1].actor == "hooks"
    build_runtime(log, provider).run_session(state.session_id)  # nothing owed any more
    again = cli("resume", state.session_id, "--db", str(tmp_path / "h.db"), cwd=tmp_path)
    assert again.returncode == 2 and "already ended" in again.stderr
    replays_without_running(tmp_path, log, state.session_id, "SessionEnd")
    assert runs(tmp_path, "SessionEnd") == 1
