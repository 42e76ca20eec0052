"""replay / fork / diff / export as a user runs them."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.test_cli import cli


def start(tmp_path: Path, steps: int = 3) -> str:
    r = cli("run", "count", "--provider", "scripted", "--model", f"adder:{steps}", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return next(line.split()[1] for line in r.stderr.splitlines() if line.startswith("session "))


def test_replay_prints_the_timeline_and_verifies_the_chain(tmp_path: Path) -> None:
    sid = start(tmp_path)
    r = cli("replay", sid, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "0 model calls and 0 tool calls" in r.stdout and "chain ok: 17 events" in r.stdout
    assert "add(a=2, b=1) → '3'" in r.stdout
    short = cli("replay", sid, "--to", "5", cwd=tmp_path)
    assert short.returncode == 0 and "seq 0..5" in short.stdout


def test_tampering_with_one_event_fails_replay_with_its_seq(tmp_path: Path) -> None:
    sid = start(tmp_path)
    db = tmp_path / ".loopstream" / "loopstream.db"
    with sqlite3.connect(db) as conn:
        (data,) = conn.execute("SELECT data FROM events WHERE session_id = ? AND seq = 9", (sid,)).fetchone()
        forged = bytes(data).replace(b"\x022", b"\x029", 1)  # the tool result '2' becomes '9'
        assert forged != bytes(data)
        conn.execute("UPDATE events SET data = ? WHERE session_id = ? AND seq = 9", (forged, sid))
    r = cli("replay", sid, cwd=tmp_path)
    assert r.returncode == 1
    assert "first bad seq 9" in r.stderr and "Traceback" not in r.stderr


def test_fork_with_another_model_then_resume_and_diff(tmp_path: Path) -> None:
    sid = start(tmp_path)
    forked = cli("fork", sid, "--at", "9", "--model", "adder:5", "--reason", "count further", cwd=tmp_path)
    assert forked.returncode == 0, forked.stderr
    child = next(line.split()[-1] for line in forked.stdout.splitlines() if line.startswith("forked "))
    resumed = cli("resume", child, "-q", cwd=tmp_path)
    assert resumed.returncode == 0 and resumed.stdout.strip() == "The result is 5.", resumed.stderr
    d = cli("diff", sid, child, cwd=tmp_path)
    assert d.returncode == 1  # they differ
    assert "b is a fork of a at seq 9" in d.stdout and "'The result is 3.'" in d.stdout
    assert cli("diff", sid, sid, cwd=tmp_path).returncode == 0


def test_fork_errors_are_one_line(tmp_path: Path) -> None:
    sid = start(tmp_path)
    r = cli("fork", sid, "--at", "999", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_export_writes_the_stored_bytes(tmp_path: Path) -> None:
    sid = start(tmp_path, steps=1)
    r = cli("export", sid, str(tmp_path / "s.avro"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s.avro").stat().st_size > 0
