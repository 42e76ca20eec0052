"""The command line as a user meets it: real processes, a real SQLite file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPSTREAM_", "OPENAI_", "ANTHROPIC_"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "loopstream.cli.app", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def test_run_show_sessions_with_scripted_model(tmp_path: Path) -> None:
    r = cli("run", "count to three", "--provider", "scripted", "--model", "adder:3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "The result is 3."
    assert "ToolCompleted" in r.stderr and "session" in r.stderr
    assert (tmp_path / ".loopstream" / "loopstream.db").is_file()
    listing = cli("sessions", cwd=tmp_path)
    assert listing.returncode == 0 and "count to three" in listing.stdout and "done" in listing.stdout
    sid = listing.stdout.splitlines()[1].split()[0]
    shown = cli("show", sid[:6], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for t in ("SessionStarted", "GoalReceived", "ModelResponded", "ToolCompleted", "SessionFinished"):
        assert t in shown.stdout
    assert "add(a=2, b=1)" in shown.stdout


def test_db_flag_and_env(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere" / "x.db"
    assert cli("run", "g", "--provider", "scripted", "--db", str(db), "-q", cwd=tmp_path).returncode == 0
    r = cli("sessions", cwd=tmp_path, env={"LOOPSTREAM_DB": str(db)})
    assert r.returncode == 0 and "done" in r.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["show", "nosuch"], "no log at .loopstream/loopstream.db: nothing has run with this log"),
    (["run", "x", "--tools", "nope", "--provider", "scripted"], "unknown tool(s): nope"),
    (["run", "x", "--provider", "martian"], "unknown provider 'martian'"),
    (["run", "x", "--provider", "scripted", "--workdir", "/definitely/not/here"], "is not a directory"),
    (["run", "x", "--provider", "scripted", "--system-prompt", "/no/such/file"], "cannot read --system-prompt"),
    (["sessions", "--bus", "redis://x"], "unknown bus 'redis://x'"),
    (["run", "x", "--provider", "openai", "--model", "gpt-4o"], "needs OPENAI_API_KEY"),
])
def test_user_mistakes_print_one_line_and_no_traceback(tmp_path: Path, args, message) -> None:
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_failed_session_exits_1_with_the_reason(tmp_path: Path) -> None:
    r = cli("run", "loop", "--provider", "scripted", "--model", "adder:50", "--max-steps", "2", "-q", cwd=tmp_path)
    assert r.returncode == 1
    assert "failed: step budget exhausted: 2 model steps" in r.stderr and "Traceback" not in r.stderr


def test_empty_log_says_how_to_start(tmp_path: Path) -> None:
    r = cli("sessions", cwd=tmp_path)
    assert r.returncode == 0 and "no sessions yet" in r.stderr


def test_help_explains_commands(tmp_path: Path) -> None:
    r = cli("--help", cwd=tmp_path)
    assert r.returncode == 0
    for command in ("run", "sessions", "show"):
        assert command in r.stdout
    r = cli("run", "--help", cwd=tmp_path)
    assert "--model" in r.stdout and "--db" in r.stdout


def test_a_corrupt_stored_event_is_named_by_its_seq(tmp_path: Path) -> None:
    import sqlite3

    assert cli("run", "x", "--provider", "scripted", "-q", cwd=tmp_path).returncode == 0
    db = tmp_path / ".loopstream" / "loopstream.db"
    with sqlite3.connect(db) as conn:
        (sid,) = conn.execute("SELECT session_id FROM sessions").fetchone()
        conn.execute("UPDATE events SET data = x'00ff00ff' WHERE seq = 3")
    for args in (["show", sid], ["resume", sid]):
        r = cli(*args, cwd=tmp_path)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert f"session {sid}" in r.stderr and "first bad seq 3: not a loopstream event envelope" in r.stderr
