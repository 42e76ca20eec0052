"""Arbitrary text — markup-like strings, control characters, lone surrogates, invalid UTF-8 —
as goals, model replies and tool results, through `run`, `show`, `sessions`, `replay` and
`diff`: no crash, every exit code one the CLI documents. Most cases run in-process (typer's
CliRunner, a real SQLite file); a handful through real subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from loopstream.cli.app import app
from loopstream.core.secrets import storable
from loopstream.core.sqlite_log import SQLiteLog

HOSTILE = ["[/]", "[/usr]", "list[0] and a[i:j]", "[bold red]", "[/bold]", "[link=x]", ":smile:", "\x1b[31m",
           "\x1b]0;t\x07", "\r", "\x00", "\x7f", "\x85", "\udcff", "\ud800", "\ud83d\ude00", "\u202e", "%", "_", "\\",
           "'", '"', "{}", "\n", "\t", " ", "é", "\ufeff"]
piece = st.one_of(st.sampled_from(HOSTILE), st.text(st.characters(exclude_categories=()), max_size=12))
hostile = st.lists(piece, max_size=8).map("".join)
reply_bytes = st.one_of(hostile.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=64))

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
    return result


def valid_goal(goal: str) -> bool:
    try:
        return bool(goal.encode("utf-8", "surrogateescape").decode("utf-8").strip())
    except UnicodeError:
        return False


def refused_as_empty(log: SQLiteLog, sid: str) -> bool:
    """A blank reply is no answer: the session failed with empty_answer (exit 1), not done."""
    last = log.read(sid)[-1].payload
    return getattr(last, "error_kind", None) == "empty_answer"


def refused_as_empty_expected(reply: bytes) -> bool:
    return not reply.decode("utf-8", "replace").strip()


def through_every_command(tmp: Path, goal: str, reply: bytes) -> None:
    (tmp / "reply.txt").write_bytes(reply)
    db = str(tmp / "log.db")
    ran = invoke("run", goal, "--provider", "scripted", "--model", f"reads:{tmp / 'reply.txt'}",
                 "--workdir", str(tmp), "--db", db)
    if not valid_goal(goal):
        assert ran.exit_code == 2 and not Path(db).exists()
        return
    with SQLiteLog(db) as log:
        (info,) = log.sessions()
        state_goal = log.read(info.session_id, 1, 1)[0].payload.text
        assert ran.exit_code == (1 if refused_as_empty(log, info.session_id) else 0), ran.output
    assert state_goal == storable(goal.encode("utf-8", "surrogateescape").decode("utf-8"))
    sid = info.session_id
    for args in (["sessions"], ["show", sid], ["show", sid[:3]], ["replay", sid], ["replay", sid, "--json"],
                 ["replay", sid, "--check"], ["diff", sid, sid]):
        result = invoke(*args, "--db", db)
        assert result.exit_code == 0, (args, result.output)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(goal=hostile, reply=reply_bytes)
def test_hostile_text_never_crashes_a_command(goal: str, reply: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        through_every_command(Path(tmp), goal, reply)


def test_hostile_text_through_real_processes(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPSTREAM_", "OPENAI_", "ANTHROPIC_"))}
    printable = "".join(h for h in HOSTILE if h != "\x00" and not any(0xD800 <= ord(c) <= 0xDFFF for c in h))
    cases = [(printable.encode(), b"[/] \xff\xfe [bold]x\x1b[2J :smile:"),
             (b"[/usr] caf\xe9", b"not run: the goal is not UTF-8"),
             (b"%_\\ [/]", "\ud83d \udcff [/]".encode("utf-8", "surrogatepass")),
             (b"an empty reply", b"")]
    for i, (goal, reply) in enumerate(cases):
        work = tmp_path / str(i)
        work.mkdir()
        (work / "reply.txt").write_bytes(reply)

        def cli(*args: str | bytes) -> subprocess.CompletedProcess:
            r = subprocess.run([sys.executable, "-m", "loopstream.cli.app", *args], cwd=work, env=env,
                               capture_output=True, timeout=120)
            assert b"Traceback" not in r.stderr, r.stderr.decode(errors="replace")
            return r

        ran = cli("run", goal, "--provider", "scripted", "--model", "reads:reply.txt")
        if i == 1:
            assert ran.returncode == 2 and b"not valid UTF-8" in ran.stderr
            continue
        assert b"\x1b" not in ran.stdout + ran.stderr
        with SQLiteLog(work / ".loopstream" / "loopstream.db") as log:
            sid = log.sessions()[-1].session_id
            assert ran.returncode == (1 if refused_as_empty(log, sid) else 0), ran.stderr
        assert refused_as_empty_expected(reply) == (ran.returncode == 1)
        for args in (["sessions"], ["show", sid], ["replay", sid], ["diff", sid, sid]):
            r = cli(*args)
            assert r.returncode == 0, (args, r.stderr)
            assert b"\x1b" not in r.stdout
