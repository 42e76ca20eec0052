"""Side-effect tools (write_file, edit_file, shell), the workspace checkpoint taken before
each of them, and rollback to the workspace as it was after any event."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import Owed, fold, open_work
from loopstream.providers.base import ModelReply, ToolCall
from loopstream.providers.scripted import ScriptedProvider
from loopstream.replay.rollback import RollbackError, rollback
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig
from loopstream.tools import ToolContext, ToolError, default_registry
from loopstream.tools.checkpoint import Workspace, checkpoint_repo
from loopstream.tools.workspace import side_effect_registry

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="workspace checkpoints need git")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    root = tmp_path / "work"
    root.mkdir()
    (root / "keep.txt").write_text("keep\n")
    (root / "sub").mkdir()
    (root / "sub" / "code.py").write_text("def f():\n    return 1\n\ndef g():\n    return 1\n")
    return root


@pytest.fixture
def ctx(work: Path) -> ToolContext:
    return ToolContext(workdir=work)


def call(name: str, args: dict, ctx: ToolContext) -> str:
    return side_effect_registry().call(name, args, ctx)


# -- the tools -------------------------------------------------------------------------
def test_side_effect_tools_are_opt_in_and_flagged() -> None:
    assert not {"write_file", "edit_file", "shell"} & set(default_registry().names())
    tools = default_registry(allow_writes=True).tools
    assert {n: (tools[n].read_only, tools[n].idempotent) for n in ("write_file", "edit_file", "shell")} == {
        "write_file": (False, True), "edit_file": (False, True), "shell": (False, False)}
    assert all(t.read_only for n, t in tools.items() if n not in ("write_file", "edit_file", "shell"))


def test_write_file_creates_overwrites_and_makes_parents(ctx, work) -> None:
    assert call("write_file", {"path": "new/deep/a.txt", "content": "héllo"}, ctx) == \
        "wrote 6 bytes to new/deep/a.txt (new file)"
    assert (work / "new/deep/a.txt").read_text() == "héllo"
    os.chmod(work / "keep.txt", 0o640)
    assert "replaced 5 bytes" in call("write_file", {"path": "keep.txt", "content": "x"}, ctx)
    assert (work / "keep.txt").read_text() == "x" and (work / "keep.txt").stat().st_mode & 0o777 == 0o640
    assert not [p for p in work.rglob("*.tmp")]


def test_edit_file_replaces_one_exact_match(ctx, work) -> None:
    out = call("edit_file", {"path": "sub/code.py", "old": "def g():\n    return 1", "new": "def g():\n    return 2"}, ctx)
    assert out.startswith("edited sub/code.py") and "line 4" in out
    assert (work / "sub/code.py").read_text() == "def f():\n    return 1\n\ndef g():\n    return 2\n"
    with pytest.raises(ToolError) as many:
        call("edit_file", {"path": "sub/code.py", "old": "def ", "new": "async def "}, ctx)
    assert many.value.kind == "ambiguous_match" and "2 times" in str(many.value)
    with pytest.raises(ToolError) as none:
        call("edit_file", {"path": "sub/code.py", "old": "return 3", "new": "return 4"}, ctx)
    assert none.value.kind == "no_match"
    with pytest.raises(ToolError) as missing:
        call("edit_file", {"path": "nope.py", "old": "a", "new": "b"}, ctx)
    assert missing.value.kind == "not_found"
    (work / "win.txt").write_bytes(b"one\r\ntwo\r\n")
    call("edit_file", {"path": "win.txt", "old": "one\ntwo", "new": "1\n2"}, ctx)
    assert (work / "win.txt").read_bytes() == b"1\r\n2\r\n"


@pytest.mark.parametrize("path", ["../escape.txt", "/tmp/escape.txt", "sub/../../escape.txt",
                                  ".git/config", ".loopstream/x", "link/escape.txt", "."])
def test_writes_are_confined_to_the_workdir(ctx, work, path) -> None:
    (work / ".git").mkdir()
    (work / "link").symlink_to(work.parent)
    for name, args in (("write_file", {"path": path, "content": "x"}),
                       ("edit_file", {"path": path, "old": "a", "new": "b"})):
        with pytest.raises(ToolError) as info:
            call(name, args, ctx)
        assert info.value.kind in ("permission_denied", "invalid_arguments")
    assert not (work.parent / "escape.txt").exists() and not (work / ".git" / "config").exists()


def test_shell_runs_in_the_workdir_with_a_scrubbed_env(ctx, work, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-leak-123")
    monkeypatch.setenv("SOME_UNRELATED_VAR", "x")
    out = call("shell", {"command": 'pwd; echo "key=${OPENAI_API_KEY:-unset} other=${SOME_UNRELATED_VAR:-unset}"; ls'}, ctx)
    assert out.splitlines()[:3] == ["exit code 0", str(work.resolve()), "key=unset other=unset"]
    assert "keep.txt" in out
    assert call("shell", {"command": "echo oops >&2; exit 3"}, ctx) == "exit code 3\noops\n"
    big = call("shell", {"command": "yes 0123456789 | head -c 1000000"}, ctx)
    assert len(big) < 13_000 and "bytes omitted" in big


def test_shell_timeout_kills_the_command(ctx) -> None:
    started = time.monotonic()
    with pytest.raises(ToolError) as info:
        call("shell", {"command": "echo started; sleep 30", "timeout_s": 0.5}, ctx)
    assert info.value.kind == "timeout" and "started" in str(info.value)
    assert time.monotonic() - started < 10
    started = time.monotonic()  # a background child does not keep the call open
    assert call("shell", {"command": "sleep 30 & echo done"}, ctx).startswith("exit code 0\ndone")
    assert time.monotonic() - started < 10
    with pytest.raises(ToolError):
        call("shell", {"command": "true", "timeout_s": 0}, ctx)


# -- checkpoints in a session ----------------------------------------------------------
def write(call_id: str, path: str, content: str) -> ToolCall:
    return ToolCall(call_id=call_id, name="write_file", arguments={"path": path, "content": content})


def two_writes_session(log, work: Path, **kw):
    provider = ScriptedProvider([
        ModelReply(tool_calls=[write("w1", "a.txt", "version 1")]),
        ModelReply(tool_calls=[write("w2", "a.txt", "version 2"), write("w3", "later/b.txt", "created later")]),
        ModelReply(text="done"),
    ])
    rt = build_runtime(log, provider, default_registry(allow_writes=True))
    config = SessionConfig(provider="scripted", model="scripted", tools=["read_file", "write_file"],
                           workdir=str(work), **kw)
    sid = rt.start_session("write twice", config)
    return rt, sid


@pytest.fixture
def log(tmp_path):
    with SQLiteLog(tmp_path / "log.db") as log:
        yield log


def test_checkpoint_is_logged_before_each_write(log, work) -> None:
    rt, sid = two_writes_session(log, work)
    state = rt.run_session(sid)
    assert state.status == "done" and (work / "a.txt").read_text() == "version 2"
    events = log.read(sid)
    by_id = {e.event_id: e for e in events}
    tool_events = [(e.type, e.payload.call_id) for e in events
                   if e.type in ("ToolRequested", "WorkspaceCheckpointed", "ToolCompleted")]
    # Each write runs right after its own checkpoint, before the next call is checkpointed.
    assert tool_events == [
        ("ToolRequested", "s1.0.w1"), ("WorkspaceCheckpointed", "s1.0.w1"), ("ToolCompleted", "s1.0.w1"),
        ("ToolRequested", "s2.0.w2"), ("ToolRequested", "s2.1.w3"),
        ("WorkspaceCheckpointed", "s2.0.w2"), ("ToolCompleted", "s2.0.w2"),
        ("WorkspaceCheckpointed", "s2.1.w3"), ("ToolCompleted", "s2.1.w3"),
    ]
    cps = [e for e in events if e.type == "WorkspaceCheckpointed"]
    for cp in cps:  # causation: ToolRequested -> WorkspaceCheckpointed -> ToolCompleted
        assert by_id[cp.causation_id].type == "ToolRequested"
        done = next(e for e in events if e.type == "ToolCompleted" and e.payload.call_id == cp.payload.call_id)
        assert done.causation_id == cp.event_id and cp.seq < done.seq
        assert cp.payload.workdir == str(work.resolve())
    # The checkpoints hold the workspace before each write; the user's files are untouched by them.
    ws = Workspace(work)
    assert [c.payload.files_changed for c in cps] == [2, 1, 1]  # keep.txt + sub/code.py; a.txt; a.txt
    assert ws.changes(cps[0].payload.commit, cps[1].payload.commit) == [("A", "a.txt")]
    assert ws.changes(cps[1].payload.commit, cps[2].payload.commit) == [("M", "a.txt")]
    assert checkpoint_repo(work).is_dir() and not (work / ".git").exists()
    assert fold(events) == state  # the fold of the stored log is where the runtime ended


def test_a_crash_after_the_checkpoint_runs_the_tool_once_on_resume(log, work) -> None:
    provider = ScriptedProvider([ModelReply(tool_calls=[write("w1", "a.txt", "v1")]), ModelReply(text="ok")])
    config = SessionConfig(provider="scripted", model="scripted", tools=["write_file"], workdir=str(work))

    class Crash(Exception):
        pass

    def crash_after_checkpoint(event) -> None:  # the checkpoint is in the log, the tool has not run
        if event.type == "WorkspaceCheckpointed":
            raise Crash

    rt = build_runtime(log, provider, default_registry(allow_writes=True), on_event=crash_after_checkpoint)
    sid = rt.start_session("write once", config)
    with pytest.raises(Crash):
        rt.run_session(sid)
    state = rt.load(sid)
    assert log.read(sid)[-1].type == "WorkspaceCheckpointed" and not (work / "a.txt").exists()
    assert state.status == "awaiting_tools" and open_work(state) == [Owed(state.seq, "tools")]  # owed: the checkpoint
    # A redelivered ToolRequested is not owed any more: no processor is called for it.
    requested = next(e for e in log.read(sid) if e.type == "ToolRequested")
    assert rt.dispatch.owed(state, requested.seq) is None
    final = build_runtime(log, provider, default_registry(allow_writes=True)).run_session(sid)
    assert final.status == "done" and (work / "a.txt").read_text() == "v1"  # idempotent: run after the crash
    types = [e.type for e in log.read(sid)]
    assert types.count("WorkspaceCheckpointed") == 1 and types.count("ToolCompleted") == 1


def test_bad_arguments_fail_without_a_checkpoint_and_no_git_means_no_write(log, work, monkeypatch) -> None:
    provider = ScriptedProvider([
        ModelReply(tool_calls=[ToolCall(call_id="x", name="write_file", arguments={"path": "a.txt"})]),
        ModelReply(tool_calls=[write("y", "a.txt", "v1")]),
        ModelReply(text="gave up"),
    ])
    config = SessionConfig(provider="scripted", model="scripted", tools=["write_file"], workdir=str(work))
    rt = build_runtime(log, provider, default_registry(allow_writes=True))
    sid = rt.start_session("g", config)
    empty = work.parent / "no-git-here"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert rt.run_session(sid).status == "done"
    failed = [e.payload for e in log.read(sid) if e.type == "ToolFailed"]
    assert [f.error_kind for f in failed] == ["invalid_arguments", "checkpoint_failed"]
    assert "did not run" in failed[1].message and "git" in failed[1].message
    assert not (work / "a.txt").exists()
    assert "WorkspaceCheckpointed" not in [e.type for e in log.read(sid)]


# -- rollback --------------------------------------------------------------------------
def test_rollback_between_two_writes_restores_the_first_version(tmp_path, work) -> None:
    # The log lives inside the workdir, unexcluded: the worst case. Rollback must not touch it.
    with SQLiteLog(work / "log.db") as log:
        rt, sid = two_writes_session(log, work)
        assert rt.run_session(sid).status == "done"
        (work / "keep.txt").unlink()  # changes after the session are rolled back too
        events = log.read(sid)
        first_done = next(e.seq for e in events if e.type == "ToolCompleted")
        result = rollback(log, sid, first_done)
        assert result.restored and result.checkpoint_seq > first_done
        assert (work / "a.txt").read_text() == "version 1"
        assert not (work / "later").exists()  # created later: removed, with its empty directory
        assert (work / "keep.txt").read_text() == "keep\n"
        assert (result.modified, result.recreated, result.deleted) == (["a.txt"], ["keep.txt"], ["later/b.txt"])
        assert {"log.db", "log.db-wal"} & set(result.restore.skipped)
        assert log.read(sid) == events  # the log still reads, unchanged
        # The fork continues from that seq, in a workspace that matches it.
        assert result.fork_session_id
        child = log.read(result.fork_session_id)
        assert child[-1].type == "SessionForked" and child[-1].payload.parent_seq == first_done
        assert "restored" in result.describe() and result.fork_session_id in result.describe()

        # Before the first write: a.txt did not exist yet. The rollback itself can be undone.
        before = rollback(log, sid, 2, fork_session=False)
        assert not (work / "a.txt").exists() and before.deleted == ["a.txt"]
        Workspace(work).restore(before.restore.backup_commit)
        assert (work / "a.txt").read_text() == "version 1"

        # After the last write: nothing to restore.
        last = rollback(log, sid, events[-1].seq, fork_session=False)
        assert not last.restored and "already as it was" in last.describe()
        with pytest.raises(RollbackError):
            rollback(log, sid, len(events) + 5)


def test_rollback_at_a_checkpoint_is_the_state_before_its_write(log, work) -> None:
    rt, sid = two_writes_session(log, work)
    rt.run_session(sid)
    cp = [e for e in log.read(sid) if e.type == "WorkspaceCheckpointed"][1]  # before version 2
    result = rollback(log, sid, cp.seq)
    assert result.checkpoint_seq == cp.seq and (work / "a.txt").read_text() == "version 1"
    # The fork lands with that call checkpointed: resuming runs the write without a new checkpoint.
    provider = ScriptedProvider([ModelReply(text="done again")])
    child = build_runtime(log, provider, default_registry(allow_writes=True)).run_session(result.fork_session_id)
    assert child.status == "done" and (work / "a.txt").read_text() == "version 2"


# -- the command line ------------------------------------------------------------------
def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPSTREAM_", "OPENAI_", "ANTHROPIC_"))}
    return subprocess.run([sys.executable, "-m", "loopstream.cli.app", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_rollback(tmp_path, work) -> None:
    db = tmp_path / "cli.db"
    with SQLiteLog(db) as log:
        rt, sid = two_writes_session(log, work)
        rt.run_session(sid)
        first_done = next(e.seq for e in log.read(sid) if e.type == "ToolCompleted")
    r = cli("rollback", sid[:8], "--to", str(first_done), "--yes", "--db", str(db), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "restored  a.txt" in r.stdout and "deleted   later/b.txt" in r.stdout
    assert "new session" in r.stdout and "loopstream resume" in r.stderr and "--checkpoint" in r.stderr
    assert (work / "a.txt").read_text() == "version 1" and not (work / "later").exists()
    bad = cli("rollback", sid, "--to", "999", "--db", str(db), cwd=tmp_path)
    assert bad.returncode == 2 and "cannot roll back to 999" in bad.stderr


def test_cli_run_needs_allow_writes_for_side_effect_tools(tmp_path) -> None:
    r = cli("run", "g", "--provider", "scripted", "--tools", "add,write_file", "--db", str(tmp_path / "x.db"),
            cwd=tmp_path)
    assert r.returncode == 2 and "--allow-writes" in r.stderr
    ok = cli("run", "g", "--provider", "scripted", "--tools", "add,write_file", "--allow-writes", "-q",
             "--db", str(tmp_path / "x.db"), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    with SQLiteLog(tmp_path / "x.db") as log:  # the log lives in the workdir: never snapshotted
        started = log.read(log.sessions()[-1].session_id, 0, 0)[0].payload
    assert "write_file" in started.tools and json.loads(started.config_json)["checkpoint_exclude"][0] == "/x.db"
