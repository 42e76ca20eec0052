"""What the commands share: the log options, opening the log, session ids, reading text
the user hands over (goals, prompt files), and the one error users can fix."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from loopstream.core.log import Log, SessionNotFound
from loopstream.core.sqlite_log import LogNotFound, durability_setting
from loopstream.kafka.bus import DEFAULT_DB, open_log

DbOpt = Annotated[Optional[Path], typer.Option(
    "--db", envvar="LOOPSTREAM_DB", show_default=False,
    help=f"SQLite log file (default: {DEFAULT_DB}).")]
BusOpt = Annotated[Optional[str], typer.Option(
    "--bus", envvar="LOOPSTREAM_BUS", show_default=False,
    help="sqlite:///PATH or kafka://HOST:PORT (default: the SQLite log of --db).")]
SessionArg = Annotated[str, typer.Argument(help="Session id (a unique prefix is enough).", show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Do not print progress.")]

MAX_GOAL_BYTES = 16 * 1024 * 1024


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2."""


def reader(bus: str | None, db: Path | None) -> Log:
    """The log for a command that only reads: opened read-only, never created."""
    try:
        return open_log(bus, db, readonly=True)
    except LogNotFound as exc:
        raise LogNotFound(f"{exc}: nothing has run with this log (choose another with --db or LOOPSTREAM_DB)") from None


DurabilityOpt = Annotated[Optional[str], typer.Option(
    "--durability", envvar="LOOPSTREAM_DURABILITY", show_default=False,
    help="normal | full: how hard each commit of a SQLite log is pushed to disk (default: normal; "
         "both survive a killed process, full also an OS crash or power loss; docs/performance.md).")]


def writer(bus: str | None, db: Path | None, durability: str | None = None) -> Log:
    """The log for a command that appends (created if missing)."""
    try:
        durability = durability_setting(durability)
    except ValueError as exc:
        raise UserError(f"--durability (or LOOPSTREAM_DURABILITY): {exc}") from None
    return open_log(bus, db, durability=durability)


def resolve(log: Log, session: str) -> str:
    """The full session id for `session` (an id or a unique prefix of one)."""
    if not session:
        raise UserError("the session id is empty")
    find = getattr(log, "find_session", None)
    matches = find(session) if find else [session]
    if session in matches or (not find and log.next_seq(session)):
        return session
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise SessionNotFound(session)
    raise UserError(f"session prefix {session!r} is ambiguous: {', '.join(matches[:5])}")


def read_goal(goal: str | None, goal_file: Path | None) -> str:
    """The goal from the argument, a file, or stdin (`--goal-file -`): valid UTF-8, not blank."""
    if goal is not None and goal_file is not None:
        raise UserError("give the goal as an argument or with --goal-file, not both")
    if goal is None and goal_file is None:
        raise UserError("no goal: pass it as an argument, or --goal-file PATH (- reads stdin)")
    if goal_file is not None:
        where = "stdin" if str(goal_file) == "-" else f"--goal-file {goal_file}"
        text = _utf8(_read_bytes(goal_file), where)
    else:
        where = "the goal"
        try:
            raw = goal.encode("utf-8", "surrogateescape")  # argv's undecodable bytes come back as they were
        except UnicodeEncodeError as exc:
            raise UserError(f"the goal is not valid Unicode (a lone surrogate at offset {exc.start})") from None
        text = _utf8(raw, where)
    if not text.strip():
        raise UserError(f"{where} is empty: say what the agent should do")
    return text


def read_text_file(path: Path, option: str) -> str:
    """A UTF-8 text file named by `option` (e.g. --system-prompt)."""
    return _utf8(_read_bytes(path, option), f"{option} {path}")


def _read_bytes(path: Path, option: str = "--goal-file") -> bytes:
    try:
        if str(path) == "-":
            data = sys.stdin.buffer.read(MAX_GOAL_BYTES + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_GOAL_BYTES + 1)
    except OSError as exc:
        raise UserError(f"cannot read {option} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_GOAL_BYTES:
        raise UserError(f"{option} {path} is larger than {MAX_GOAL_BYTES // (1024 * 1024)} MiB")
    return data


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
