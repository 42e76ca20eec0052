"""Goal mode: a final answer is verified by the goal's command (in the sandbox); failures go back
to the model until the check passes or the budgets end it; pause and resume survive restarts;
kill -9 of a real process mid-goal, then `resume`, finishes without redoing a tool call."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loopstream.cli.app import app
from loopstream.core import events as ev
from loopstream.core.fsm import IllegalTransition
from loopstream.core.log import LogError
from loopstream.core.policy import GoalMode, SessionPolicy
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from loopstream.providers.base import ModelReply
from loopstream.providers.scripted import ScriptedProvider, scripted_from_spec
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.decisions import DecisionError, pause, resume_paused
from loopstream.runtime.inline import SessionConfig
from loopstream.tools import default_registry
from tests.helpers import make_event, wait_for

pytestmark = [pytest.mark.skipif(shutil.which("bwrap") is None, reason="the verifier runs in bubblewrap"),
              pytest.mark.skipif(shutil.which("git") is None, reason="workspace checkpoints need git")]
VERIFY = "python3 test_calc.py"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A small repository with a failing test."""
    root = tmp_path / "repo"
    root.mkdir()
    (root / "calc.py").write_text("def add(a, b):\n    return 0\n")
    (root / "test_calc.py").write_text('from calc import add\n\nassert add(2, 3) == 5, f"add(2, 3) = {add(2, 3)}, '
                                       'expected 5"\nprint("1 passed")\n')
    return root


def goal_config(repo: Path, **goal) -> SessionConfig:
    return SessionConfig(provider="scripted", model="scripted:goalfix", tools=["shell", "write_file"],
                         workdir=str(repo), max_steps=30,
                         policy=SessionPolicy(goal=GoalMode(verify_command=VERIFY, **goal)))


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loopstream.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, **kw)


def types(log: SQLiteLog, sid: str) -> list[str]:
    return [e.type for e in log.read(sid)]


def test_a_goal_iterates_until_its_test_passes(tmp_path: Path, repo: Path) -> None:
    with SQLiteLog(tmp_path / "log.db") as log:
        rt = build_runtime(log, scripted_from_spec("goalfix"), default_registry(allow_writes=True))
        sid = rt.start_session("make test_calc.py pass", goal_config(repo))
        state = rt.run_session(sid)
        events = log.read(sid)
    assert state.status == "done" and "return a + b" in (repo / "calc.py").read_text()
    verified = [e.payload for e in events if e.type == "GoalVerified"]
    assert [(v.iteration, v.passed) for v in verified] == [(1, False), (2, False), (3, True)]
    assert "add(2, 3) = -1, expected 5" in verified[0].output and verified[2].output == "1 passed\n"
    assert verified[0].exit_code == 1 and verified[2].exit_code == 0
    # the verifier's output reached the model as a message, and the session ended right after the pass
    assert any("add(2, 3) = 6, expected 5" in m.content for m in state.messages if m.role == "user")
    assert [e.type for e in events[-3:]] == ["GoalVerificationRequested", "GoalVerified", "SessionFinished"]
    assert (repo / "attempts.log").read_text().split() == ["attempt-1", "attempt-2", "attempt-3"]
    assert fold(events) == state and state.goal_iterations == 3 and state.last_verification == "passed"
    assert json.loads(events[0].payload.config_json)["goal"] == {"verify_command": VERIFY}


def test_a_goal_that_never_verifies_fails_after_max_iterations(tmp_path: Path, repo: Path) -> None:
    config = goal_config(repo, max_iterations=2)
    config.policy = SessionPolicy(goal=GoalMode(verify_command="echo still broken; exit 7", max_iterations=2))
    with SQLiteLog(tmp_path / "log.db") as log:
        rt = build_runtime(log, scripted_from_spec("goalfix"), default_registry(allow_writes=True))
        sid = rt.start_session("never", config)
        state = rt.run_session(sid)
    assert state.status == "failed" and "failed 2 time(s)" in state.error and "exit code 7" in state.error
    assert [m.content for m in state.messages if "still broken" in m.content]


def test_the_verifier_runs_in_the_sandbox(tmp_path: Path, repo: Path) -> None:
    config = goal_config(repo)
    config.policy = SessionPolicy(goal=GoalMode(verify_command=f"touch {tmp_path}/escaped; cat ~/.ssh/id_rsa",
                                                max_iterations=1))
    with SQLiteLog(tmp_path / "log.db") as log:
        rt = build_runtime(log, ScriptedProvider([ModelReply(text="done")]), default_registry(allow_writes=True))
        state = rt.run_session(rt.start_session("x", config))
        verified = [e.payload for e in log.read(state.session_id) if e.type == "GoalVerified"]
    assert state.status == "failed" and not (tmp_path / "escaped").exists()
    assert not verified[0].passed and "No such file" in verified[0].output


def test_pause_between_steps_and_resume(tmp_path: Path, repo: Path) -> None:
    with SQLiteLog(tmp_path / "log.db") as log:
        rt = build_runtime(log, scripted_from_spec("goalfix"), default_registry(allow_writes=True))
        sid = rt.start_session("make test_calc.py pass", goal_config(repo))
        assert pause(log, sid, by="person:alice", reason="lunch").status == "paused"  # planning: at once
        with pytest.raises(DecisionError, match="already paused"):
            pause(log, sid)
        state = rt.run_session(sid)
        assert state.status == "paused" and state.paused_by == "person:alice" and state.step == 0
        assert not (repo / "attempts.log").exists()
        with pytest.raises(IllegalTransition):  # no model step while paused
            _illegal(log, sid)
        assert resume_paused(log, sid, by="person:alice").status == "planning"
        with pytest.raises(DecisionError, match="not paused"):
            resume_paused(log, sid)
        assert rt.run_session(sid).status == "done"


def _illegal(log: SQLiteLog, sid: str) -> None:
    state = fold(log.read(sid))
    fold([make_event(ev.ModelRequested(request_id="r", step=1, attempt=1, model="m"), sid, state.next_seq)], state)


def start_cli_goal(db: Path, repo: Path, delay: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "loopstream.cli", "run", "--db", str(db), "--provider", "scripted",
         "--model", f"goalfix:{delay}", "--tools", "shell,write_file", "--allow-writes", "--workdir", str(repo),
         "--max-steps", "30", "--goal-verify", VERIFY, "make test_calc.py pass"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def only_session(db: Path) -> str | None:
    try:
        with SQLiteLog(db, readonly=True) as log:
            sessions = log.sessions()
            return sessions[0].session_id if sessions else None
    except LogError:  # not there yet, or being created
        return None


def count(db: Path, sid: str, kind: str) -> int:
    with SQLiteLog(db, readonly=True) as log:
        return types(log, sid).count(kind)


def test_kill_9_mid_goal_then_resume_finishes_without_redoing_tool_calls(tmp_path: Path, repo: Path) -> None:
    db = tmp_path / "log.db"
    proc = start_cli_goal(db, repo, "0.4")
    try:
        sid = wait_for(lambda: only_session(db), timeout=60)
        assert sid, proc.stderr.read() if proc.poll() is not None else "no session"
        assert wait_for(lambda: count(db, sid, "GoalVerified") >= 1, timeout=120)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with SQLiteLog(db, readonly=True) as log:
        before = log.read(sid)
    assert before[-1].type not in ("SessionFinished", "SessionFailed")
    done_before = {e.payload.call_id for e in before if e.type == "ToolCompleted"}
    resumed = cli("resume", sid, "--allow-writes", "--db", str(db))
    assert resumed.returncode == 0, resumed.stderr
    with SQLiteLog(db, readonly=True) as log:
        events = log.read(sid)
    state = fold(events)
    assert state.status == "done" and [e.type for e in events[-2:]] == ["GoalVerified", "SessionFinished"]
    settled = [e.payload.call_id for e in events if e.type in ("ToolCompleted", "ToolFailed")]
    assert len(settled) == len(set(settled))  # no tool call has two results
    assert done_before <= set(settled)
    # each shell call that ran wrote its line once: no attempt twice, none redone after the kill
    lines = (repo / "attempts.log").read_text().split()
    assert len(lines) == len(set(lines))
    shell_done = [e for e in events if e.type == "ToolCompleted" and e.payload.name == "shell"]
    unknown = [e for e in events if e.type == "ToolFailed" and e.payload.error_kind == "outcome_unknown"]
    assert len(shell_done) <= len(lines) <= len(shell_done) + len(unknown)
    assert "1 passed" in [e.payload.output for e in events if e.type == "GoalVerified"][-1]


def test_pause_while_running_then_resume_after_a_restart(tmp_path: Path, repo: Path) -> None:
    db = tmp_path / "log.db"
    proc = start_cli_goal(db, repo, "0.5")
    try:
        sid = wait_for(lambda: only_session(db), timeout=60)
        assert sid and wait_for(lambda: count(db, sid, "ModelResponded") >= 1, timeout=60)
        paused = CliRunner().invoke(app, ["goal", "pause", sid, "--db", str(db), "--reason", "coffee"])
        assert paused.exit_code == 0, paused.output
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3 and "paused" in err and f"loopstream goal resume {sid}" in err
    status = CliRunner().invoke(app, ["goal", "status", sid, "--db", str(db)])
    assert status.exit_code == 0 and f"session {sid}: paused" in status.output
    with SQLiteLog(db, readonly=True) as log:
        paused_events = [e for e in log.read(sid) if e.type == "GoalPaused"]
    assert paused_events[0].payload.reason == "coffee"
    # a new process (the restart) sees it paused; plain `resume` keeps it paused
    again = cli("resume", sid, "--allow-writes", "--db", str(db))
    assert again.returncode == 3 and count(db, sid, "SessionFinished") == 0
    finished = cli("goal", "resume", sid, "--allow-writes", "--db", str(db), "-q")
    assert finished.returncode == 0, finished.stderr
    assert count(db, sid, "SessionFinished") == 1 and "return a + b" in (repo / "calc.py").read_text()
    status = CliRunner().invoke(app, ["goal", "status", sid, "--db", str(db)])
    assert "done" in status.output and "last verification: passed" in status.output


def test_goal_cli_errors_are_one_line(tmp_path: Path, repo: Path) -> None:
    db = tmp_path / "log.db"
    runner = CliRunner()
    r = runner.invoke(app, ["run", "--db", str(db), "--provider", "scripted", "--model", "goalfix", "--tools",
                            "shell,write_file", "--allow-writes", "--workdir", str(repo), "--goal-verify", " ", "x"])
    assert r.exit_code == 2 and "--goal-verify" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["run", "--db", str(db), "--provider", "scripted", "-q", "--tools", "add", "2+2"])
    assert r.exit_code == 0
    sid = only_session(db)
    for args, why in ((["goal", "pause", sid], "already ended"), (["goal", "resume", sid], "not paused"),
                      (["goal", "status", "nope"], "nope")):
        r = runner.invoke(app, [*args, "--db", str(db)])
        assert r.exit_code == 2 and why in r.output and "Traceback" not in r.output, (args, r.output)


def test_goal_start_runs_a_goal_to_a_passing_verification(tmp_path: Path, repo: Path) -> None:
    db = tmp_path / "log.db"
    r = CliRunner().invoke(app, ["goal", "start", "make test_calc.py pass", "--verify", VERIFY, "--provider",
                                 "scripted", "--model", "goalfix", "--tools", "shell,write_file", "--workdir",
                                 str(repo), "--db", str(db)])
    assert r.exit_code == 0, r.output
    assert "goal iteration 3: PASSED" in r.output and "sandbox=workspace-write" in r.output
    show = CliRunner().invoke(app, ["show", only_session(db), "--db", str(db)])
    assert "GoalVerified" in show.output and "AssertionError: add(2, 3) = -1" in show.output
