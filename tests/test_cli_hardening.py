"""The command line under hostile input and hostile conditions: each test is one class of
problem found by trying the CLI as a new user, run with real files, real processes and the
real CLI in a subprocess."""
from __future__ import annotations

import ast
import os
import pty
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loopstream.core.policy import load_policy
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.providers.base import ModelReply, ToolCall
from loopstream.providers.scripted import ScriptedProvider, adder_script
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig
from loopstream.tools.builtin import default_registry
from loopstream.tools.registry import tool
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "loopstream.cli.app"]
MARKUP = "look at [/usr] and list[0] and a[i:j] [/] [bold red]x[/bold red] :smile:"


def env(extra: dict | None = None) -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPSTREAM_", "OPENAI_", "ANTHROPIC_"))}
    out.update(extra or {})
    return out


def cli(*args, cwd: Path, prefix: list[str] | None = None, stdin=None, input: bytes | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([*(prefix or []), *CLI, *args], cwd=cwd, env=env(), capture_output=True, timeout=timeout,
                       stdin=stdin, input=input)
    r.stdout, r.stderr = r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")
    return r


def one_line_error(r: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for f in fragments:
        assert f in r.stderr, r.stderr


def run_scripted(tmp_path: Path, goal: str = "count", model: str = "adder:1", *extra: str) -> str:
    r = cli("run", goal, "--provider", "scripted", "--model", model, "-q", *extra, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return session_ids(tmp_path)[-1]


def session_ids(tmp_path: Path, db: Path | None = None) -> list[str]:
    with SQLiteLog(db or tmp_path / ".loopstream" / "loopstream.db") as log:
        return [s.session_id for s in log.sessions()]


# -- 1. no text is ever read as markup ------------------------------------------------------
def test_bracketed_text_from_the_goal_the_model_and_a_tool_is_printed_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "reply.txt").write_text(MARKUP)
    r = cli("run", MARKUP, "--provider", "scripted", "--model", "reads:reply.txt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == MARKUP + "\n"  # the model's answer, exactly
    assert f"'{MARKUP}'" in r.stderr  # the goal's progress line keeps every bracket
    assert r.stderr.count("[bold red]x[/bold red]") >= 3  # goal, tool result, answer
    sid = session_ids(tmp_path)[-1]
    shown = cli("show", sid, "--width", "400", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("[/usr] and list[0] and a[i:j] [/]") >= 3
    run_scripted(tmp_path, "a plain goal")
    listing = cli("sessions", cwd=tmp_path)  # one bracketed goal hides no session
    assert listing.returncode == 0, listing.stderr
    assert "look at [/usr] and list[0]" in listing.stdout and "a plain goal" in listing.stdout
    replayed = cli("replay", sid, cwd=tmp_path)
    assert replayed.returncode == 0 and "[/usr]" in replayed.stdout


def test_control_characters_reach_the_terminal_only_as_escapes(tmp_path: Path) -> None:
    (tmp_path / "reply.txt").write_text("red \x1b[31mALERT\x1b[0m bell\x07 title\x1b]0;owned\x07")
    r = cli("run", "say it", "--provider", "scripted", "--model", "reads:reply.txt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert r.stdout.strip() == r"red \x1b[31mALERT\x1b[0m bell\x07 title\x1b]0;owned\x07"


def test_only_the_output_module_talks_to_rich() -> None:
    """Structural: every module of the CLI prints through cli/output.py, which reads no markup."""
    offenders = []
    for path in (ROOT / "cli").glob("*.py"):
        if path.name == "output.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                offenders += [f"{path.name} imports {n}" for n in names if n.split(".")[0] == "rich"]
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                    "print", "echo", "secho"):
                offenders.append(f"{path.name}:{node.lineno} calls {ast.unparse(node.func)}")
    assert not offenders, offenders


# -- 6. the log, read-only and locked ---------------------------------------------------------
def readonly(path: Path) -> list[str]:
    """A command prefix under which `path` (a file or a directory) cannot be written: a
    read-only bind mount in a private mount namespace as root, file modes otherwise."""
    if os.geteuid() != 0:
        for p in [path, *(path.iterdir() if path.is_dir() else [])]:
            p.chmod(p.stat().st_mode & ~0o222)
        return []
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs unshare to mount a read-only file system")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, str(path)]


def test_read_commands_work_on_a_read_only_file_system(tmp_path: Path) -> None:
    sid = run_scripted(tmp_path, "count", "adder:2")
    ro = readonly(tmp_path / ".loopstream")
    for args in (["sessions"], ["show", sid], ["replay", sid], ["replay", sid, "--check"], ["diff", sid, sid]):
        r = cli(*args, prefix=ro, cwd=tmp_path)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr)
        assert sid in r.stdout
    r = cli("export", sid, str(tmp_path / "s.avro"), prefix=ro, cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "s.avro").stat().st_size > 0, r.stderr


def test_run_on_a_log_that_cannot_be_written_says_so_in_one_line(tmp_path: Path) -> None:
    run_scripted(tmp_path)
    db = tmp_path / ".loopstream" / "loopstream.db"
    for target in (db, db.parent):
        r = cli("run", "count", "--provider", "scripted", prefix=readonly(target), cwd=tmp_path)
        one_line_error(r, 2, "cannot be written", str(Path(".loopstream") / "loopstream.db"))
    assert len(session_ids(tmp_path)) == 1


def test_reading_does_not_wait_for_a_writer_holding_the_lock(tmp_path: Path) -> None:
    sid = run_scripted(tmp_path)
    db = tmp_path / ".loopstream" / "loopstream.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time\nc = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
         "c.execute('BEGIN IMMEDIATE')\nprint('locked', flush=True)\ntime.sleep(300)", str(db)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for args in (["sessions"], ["show", sid], ["replay", sid]):
            r = cli(*args, cwd=tmp_path)
            assert r.returncode == 0 and sid in r.stdout, (args, r.stderr)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("command", [["sessions"], ["show", "abc"], ["replay", "abc"], ["diff", "a", "b"],
                                     ["export", "abc", "out.avro"]])
def test_read_commands_create_nothing_for_a_mistyped_db(tmp_path: Path, command: list[str]) -> None:
    r = cli(*command, "--db", "typo/lopstream.db", cwd=tmp_path)
    one_line_error(r, 2, "no log at typo/lopstream.db")
    assert not (tmp_path / "typo").exists()


def test_a_file_that_is_not_a_log_is_named(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(cli("sessions", "--db", "notes.txt", cwd=tmp_path), 2, "notes.txt")
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.close()
    one_line_error(cli("sessions", "--db", "other.db", cwd=tmp_path), 2, "other.db is not a loopstream log")


# -- 7. the messages that should be there -----------------------------------------------------
def start_slow(tmp_path: Path, seconds: float = 60) -> tuple[subprocess.Popen, Path]:
    err = tmp_path / f"run-{time.monotonic_ns()}.err"
    proc = subprocess.Popen([*CLI, "run", "count", "--provider", "scripted", "--model", f"slow:{seconds}"],
                            cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=err.open("wb"))
    assert wait_for(lambda: "ModelRequested" in err.read_text(errors="replace")), err.read_text()
    return proc, err


def test_ctrl_c_says_how_to_resume_and_resume_continues(tmp_path: Path) -> None:
    proc, err = start_slow(tmp_path)
    sid = session_ids(tmp_path)[-1]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    text = err.read_text()
    assert "interrupted" in text and f"loopstream resume {sid}" in text and "Traceback" not in text
    listing = cli("sessions", cwd=tmp_path)
    assert "interrupted" in listing.stdout, listing.stdout
    resumed = cli("resume", sid, "--provider", "scripted", "--model", "adder:1", "-q", cwd=tmp_path)
    assert resumed.returncode == 0 and resumed.stdout.strip() == "The result is 1.", resumed.stderr


def test_a_session_whose_process_died_shows_as_interrupted_and_a_live_one_as_running(tmp_path: Path) -> None:
    dead, _ = start_slow(tmp_path)
    dead.send_signal(signal.SIGKILL)
    dead.wait(timeout=30)
    live, _ = start_slow(tmp_path)
    try:
        killed, running = session_ids(tmp_path)
        rows = {line.split()[0]: line.split()[3] for line in cli("sessions", cwd=tmp_path).stdout.splitlines()[1:]}
        assert rows == {killed: "interrupted", running: "running"}
        busy = cli("resume", running, "--provider", "scripted", "--model", "adder:1", cwd=tmp_path)
        one_line_error(busy, 2, f"session {running} is being driven by process {live.pid}")
    finally:
        live.kill()
        live.wait()


def test_help_shows_environment_variables_and_defaults(tmp_path: Path) -> None:
    r = cli("run", "--help", cwd=tmp_path)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for hint in ("LOOPSTREAM_DB", "LOOPSTREAM_BUS", "LOOPSTREAM_MODEL", "LOOPSTREAM_PROVIDER", "OPENAI_BASE_URL",
                 "default: 12", ".loopstream/loopstream.db", "--goal-file"):
        assert hint in text, hint
    assert "LOOPSTREAM_DB" in cli("sessions", "--help", cwd=tmp_path).stdout


def test_the_environment_variables_the_help_names_are_read(tmp_path: Path) -> None:
    r = subprocess.run([*CLI, "run", "count", "-q"], cwd=tmp_path, capture_output=True, text=True, env=env({
        "LOOPSTREAM_PROVIDER": "scripted", "LOOPSTREAM_MODEL": "adder:2", "LOOPSTREAM_DB": str(tmp_path / "e.db")}))
    assert r.returncode == 0 and r.stdout.strip() == "The result is 2.", r.stderr
    assert (tmp_path / "e.db").is_file()


# -- 10. approvals approve only what was seen ---------------------------------------------------
def waiting_session(tmp_path: Path) -> tuple[Path, str]:
    """A session (in a real log file) that asks a person before each `add`, now waiting."""
    policy = tmp_path / "policy.toml"
    policy.write_text("[[permissions]]\ntool = 'add'\naction = 'ask'\n")
    db = tmp_path / "approve.db"
    with SQLiteLog(db) as log:
        rt = build_runtime(log, ScriptedProvider(adder_script(2)))
        sid = rt.start_session("count", SessionConfig("scripted", "adder:2", ["add"], policy=load_policy(policy)))
        assert rt.run_session(sid).status == "awaiting_approval"
    return db, sid


def asked(db: Path, sid: str) -> list[str]:
    with SQLiteLog(db) as log:
        return [e.payload.call_id for e in log.read(sid) if e.type == "ApprovalRequested"]


def decided(db: Path, sid: str) -> list[str]:
    with SQLiteLog(db) as log:
        return [e.payload.call_id for e in log.read(sid) if e.type == "ApprovalDecided"]


def test_approve_without_a_call_id_never_approves_a_call_nobody_saw(tmp_path: Path) -> None:
    db, sid = waiting_session(tmp_path)
    first = asked(db, sid)[0]
    ok = cli("approve", sid, first, "--db", str(db), cwd=tmp_path)
    assert ok.returncode == 0 and 'approved add({"a": 0, "b": 1})' in ok.stdout and first in ok.stdout, ok.stderr
    with SQLiteLog(db) as log:  # the run goes on and asks about the next call
        assert build_runtime(log, ScriptedProvider(adder_script(2))).run_session(sid).status == "awaiting_approval"
    second = asked(db, sid)[1]
    again = cli("approve", sid, "--db", str(db), cwd=tmp_path, stdin=subprocess.DEVNULL)  # the same command, twice
    one_line_error(again, 2, 'add({"a": 1, "b": 1})', f"loopstream approve {sid} {second}")
    assert decided(db, sid) == [first]


def test_approve_without_a_call_id_at_a_terminal_shows_the_call_and_asks(tmp_path: Path) -> None:
    db, sid = waiting_session(tmp_path)
    master, slave = pty.openpty()
    try:
        os.write(master, b"n\n")
        no = cli("approve", sid, "--db", str(db), cwd=tmp_path, stdin=slave)
        assert no.returncode == 1 and decided(db, sid) == []
        assert 'add({"a": 0, "b": 1})' in no.stderr
        os.write(master, b"y\n")
        yes = cli("approve", sid, "--db", str(db), cwd=tmp_path, stdin=slave)
        assert yes.returncode == 0 and decided(db, sid) == asked(db, sid)[:1], yes.stderr
    finally:
        os.close(master)
        os.close(slave)


# -- 11. hostile input to the CLI -----------------------------------------------------------------
def test_a_goal_that_is_not_utf8_is_a_one_line_error(tmp_path: Path) -> None:
    r = subprocess.run([*CLI, "run", b"caf\xe9 \xff", "--provider", "scripted"], cwd=tmp_path, env=env(),
                       capture_output=True)
    one_line_error(subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode()), 2,
                   "the goal is not valid UTF-8 (byte 0xe9 at offset 3)")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    one_line_error(cli("run", "--goal-file", "latin1.txt", "--provider", "scripted", cwd=tmp_path), 2,
                   "--goal-file latin1.txt is not valid UTF-8")
    assert not (tmp_path / ".loopstream").exists()


def test_a_long_goal_comes_from_a_file_or_stdin(tmp_path: Path) -> None:
    goal = "count, please. " + "é" * 80_000  # 160 KB: more than one argument may hold (128 KB), under the goal cap
    (tmp_path / "goal.txt").write_text(goal)
    for args, stdin in ((["--goal-file", "goal.txt"], None), (["--goal-file", "-"], goal.encode())):
        r = cli("run", *args, "--provider", "scripted", "-q", cwd=tmp_path, input=stdin)
        assert r.returncode == 0, r.stderr
        with SQLiteLog(tmp_path / ".loopstream" / "loopstream.db") as log:
            assert log.read(log.sessions()[-1].session_id, 1, 1)[0].payload.text == goal
    one_line_error(cli("run", "x", "--goal-file", "goal.txt", "--provider", "scripted", cwd=tmp_path), 2,
                   "not both")


@pytest.mark.parametrize("goal", ["", "   \n\t"])
def test_an_empty_goal_is_refused(tmp_path: Path, goal: str) -> None:
    one_line_error(cli("run", goal, "--provider", "scripted", cwd=tmp_path), 2, "is empty")
    one_line_error(cli("run", "--goal-file", "-", "--provider", "scripted", cwd=tmp_path, input=goal.encode()), 2,
                   "stdin is empty")
    assert not (tmp_path / ".loopstream").exists()


@pytest.mark.parametrize("blob", ["NULL", "x''"])
def test_an_empty_stored_event_is_named_by_its_seq(tmp_path: Path, blob: str) -> None:
    sid = run_scripted(tmp_path)
    with sqlite3.connect(tmp_path / ".loopstream" / "loopstream.db") as conn:
        conn.execute(f"UPDATE events SET data = {blob} WHERE seq = 4")
    for args in (["replay", sid], ["replay", sid, "--verify"], ["replay", sid, "--check"], ["show", sid],
                 ["diff", sid, sid], ["resume", sid]):
        r = cli(*args, cwd=tmp_path)
        assert r.returncode == 1 and "Traceback" not in r.stderr, (args, r.stderr)
        assert "seq 4" in r.stderr, (args, r.stderr)


def test_export_to_a_directory_is_a_one_line_error(tmp_path: Path) -> None:
    sid = run_scripted(tmp_path)
    one_line_error(cli("export", sid, str(tmp_path), cwd=tmp_path), 2, "is a directory")
    (tmp_path / "plain").write_text("a file, not a folder")
    one_line_error(cli("export", sid, str(tmp_path / "plain" / "x.avro"), cwd=tmp_path), 2, "cannot write")


def test_a_tampered_session_is_shown_with_a_warning_and_never_resumed(tmp_path: Path) -> None:
    sid = run_scripted(tmp_path)
    db = tmp_path / ".loopstream" / "loopstream.db"
    with sqlite3.connect(db) as conn:  # cut the end off, then forge the tool result '1' into '7'
        conn.execute("DELETE FROM events WHERE session_id = ? AND seq >= 6", (sid,))
        conn.execute("UPDATE sessions SET next_seq = 6, last_type = 'ToolCompleted' WHERE session_id = ?", (sid,))
        (data,) = conn.execute("SELECT data FROM events WHERE session_id = ? AND seq = 5", (sid,)).fetchone()
        forged = bytes(data).replace(b"\x021", b"\x027", 1)
        assert forged != bytes(data)
        conn.execute("UPDATE events SET data = ? WHERE session_id = ? AND seq = 5", (forged, sid))
    shown = cli("show", sid, cwd=tmp_path)
    assert shown.returncode == 1 and "ToolCompleted" in shown.stdout
    assert "first bad seq 5" in shown.stderr and "Traceback" not in shown.stderr
    one_line_error(cli("resume", sid, "--provider", "scripted", "--model", "adder:1", cwd=tmp_path), 1, f"will not resume session {sid}",
                   "first bad seq 5")
    with SQLiteLog(db) as log:
        assert log.next_seq(sid) == 6  # nothing was appended


def test_rollback_asks_first_and_says_how_to_undo_it(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    db = tmp_path / "w.db"
    with SQLiteLog(db) as log:
        provider = ScriptedProvider([
            ModelReply(tool_calls=[ToolCall(call_id="w1", name="write_file",
                                            arguments={"path": "a.txt", "content": "version 1"})]),
            ModelReply(tool_calls=[ToolCall(call_id="w2", name="write_file",
                                            arguments={"path": "later.txt", "content": "made later"})]),
            ModelReply(text="done"),
        ])
        rt = build_runtime(log, provider, default_registry(allow_writes=True))
        sid = rt.start_session("write", SessionConfig("scripted", "s", ["write_file"], workdir=str(work)))
        assert rt.run_session(sid).status == "done"
        first_done = next(e.seq for e in log.read(sid) if e.type == "ToolCompleted")
    asked_ = cli("rollback", sid, "--to", str(first_done), "--db", str(db), cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert asked_.returncode == 2 and "delete    later.txt" in asked_.stderr and "--yes" in asked_.stderr
    assert (work / "later.txt").exists()  # nothing changed without a yes
    done = cli("rollback", sid, "--to", str(first_done), "--yes", "--db", str(db), cwd=tmp_path)
    assert done.returncode == 0 and not (work / "later.txt").exists(), done.stderr
    undo = next(line.split("undo it with: ", 1)[1] for line in done.stderr.splitlines() if "undo it with" in line)
    assert undo.startswith("loopstream rollback ")
    r = cli(*undo.split()[1:], "--db", str(db), cwd=tmp_path)
    assert r.returncode == 0 and (work / "later.txt").read_text() == "made later", r.stderr


@pytest.mark.parametrize("prefix", ["_", "%", "_%", "\\"])
def test_a_session_prefix_is_literal(tmp_path: Path, prefix: str) -> None:
    run_scripted(tmp_path)
    one_line_error(cli("show", prefix, cwd=tmp_path), 2, f"no session {prefix!r}")


@pytest.mark.parametrize("exit_with", [SystemExit(3), KeyboardInterrupt()])
def test_a_tool_that_exits_fails_as_a_tool_and_the_loop_goes_on(tmp_path: Path, exit_with: BaseException) -> None:
    @tool
    def leave(code: int) -> str:
        """Exit the process."""
        raise exit_with

    provider = ScriptedProvider([ModelReply(tool_calls=[ToolCall(call_id="x", name="leave", arguments={"code": 3})]),
                                 ModelReply(text="still here")])
    with SQLiteLog(tmp_path / "t.db") as log:
        rt = build_runtime(log, provider, default_registry().add(leave))
        sid = rt.start_session("leave", SessionConfig("scripted", "s", ["leave"]))
        state = rt.run_session(sid)
        assert state.status == "done" and state.answer == "still here"
        (failed,) = [e.payload for e in log.read(sid) if e.type == "ToolFailed"]
    assert failed.error_kind == "tool_exit" and type(exit_with).__name__ in failed.message


def test_a_worker_with_no_broker_at_its_bus_address_is_a_one_line_error(tmp_path: Path) -> None:
    """Nothing listens on the port: the worker says so in one line (no traceback) and exits."""
    with socket.socket() as s:  # a free loopback port, closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = cli("worker", "--bus", f"kafka://127.0.0.1:{port}", "--role", "all", "--provider", "scripted",
            cwd=tmp_path, timeout=180)
    ours = [line for line in r.stderr.splitlines() if not line.startswith("%")]  # librdkafka's own log lines
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert ours == ["error: cannot reach the Kafka broker (Failed to get metadata: Local: Broker transport failure): "
                    "is one running at the --bus address?"]
