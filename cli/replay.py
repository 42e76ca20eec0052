"""`loopstream replay`, `fork`, `diff`, `export` and `rollback`: the work is in
loopstream.replay (its `*_command()` functions return the text and the exit code)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from loopstream.cli import output
from loopstream.cli.common import BusOpt, DbOpt, SessionArg, UserError, read_text_file, reader, resolve, writer
from loopstream.cli.output import Styled
from loopstream.replay.commands import (
    CommandResult,
    check_command,
    diff_command,
    export_command,
    fork_command,
    replay_command,
)
from loopstream.replay.fork import ForkError
from loopstream.replay.rollback import RollbackError, plan_rollback, restore_checkpoint
from loopstream.replay.rollback import rollback as roll_back
from loopstream.tools.builtin import default_registry
from loopstream.tools.checkpoint import CheckpointError

YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def emit(result: CommandResult) -> None:
    """Print a replay/fork/diff CommandResult and exit with its code."""
    if result.text:
        output.answer(result.text)
    if result.exit_code:
        if result.error:
            output.error(result.error)
        raise typer.Exit(result.exit_code)


def replay(
    session: SessionArg,
    to: Annotated[Optional[int], typer.Option("--to", min=0, show_default=False, help="Replay only up to this seq.")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Only check the hash chain.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Re-drive the orchestrator with this code and report the first decision that differs from the log.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable report.")] = False,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Rebuild a session from its log alone (no model or tool calls): the timeline of
    turns, tool calls, tokens, latencies and errors, with the hash chain verified.
    Exits 1 with the first bad seq if an event was altered."""
    log = reader(bus, db)
    sid = resolve(log, session)
    emit(check_command(log, sid, to) if check else replay_command(log, sid, to, verify_only=verify, as_json=as_json))


def fork(
    session: SessionArg,
    at: Annotated[int, typer.Option("--at", min=0, help="The last parent event the child keeps.", show_default=False)],
    model: Annotated[Optional[str], typer.Option(show_default=False, help="Model for the child's next steps.")] = None,
    provider: Annotated[Optional[str], typer.Option(show_default=False, help="Provider for the child (recorded; used by resume).")] = None,
    system_prompt: Annotated[Optional[Path], typer.Option(show_default=False, help="File with a new system prompt for the child.")] = None,
    tools: Annotated[Optional[str], typer.Option(show_default=False, help="Comma-separated tools for the child.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(min=1, show_default=False, help="New step budget.")] = None,
    message: Annotated[Optional[str], typer.Option(show_default=False, help="A new user message the child starts from.")] = None,
    reason: Annotated[str, typer.Option(help="Why, recorded in SessionForked.")] = "",
    yes: Annotated[bool, typer.Option("--yes", help="Acknowledge the parent's side effects after --at that the fork does not undo.")] = False,
    allow_writes: Annotated[bool, typer.Option("--allow-writes", help="Classify write_file/edit_file/shell as known tools.")] = False,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Start a new session from a parent's events up to --at, optionally with another
    model, prompt, tools or a new message; continue it with `loopstream resume CHILD`."""
    prompt = read_text_file(system_prompt, "--system-prompt") if system_prompt is not None else None
    log = writer(bus, db)
    sid = resolve(log, session)
    names = [t.strip() for t in tools.split(",") if t.strip()] if tools else None
    try:
        result = fork_command(log, sid, at, model=model, provider=provider, system_prompt=prompt, tools=names,
                              max_steps=max_steps, message=message, reason=reason, yes=yes,
                              registry=default_registry(allow_writes=allow_writes))
    except ForkError as exc:
        raise UserError(str(exc)) from None
    emit(result)


def diff(
    a: Annotated[str, typer.Argument(help="First session (e.g. the parent).", show_default=False)],
    b: Annotated[str, typer.Argument(help="Second session (e.g. its fork).", show_default=False)],
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Where two sessions diverge, and how their outcomes, tokens and steps compare (exit 1 if they differ)."""
    log = reader(bus, db)
    emit(diff_command(log, resolve(log, a), resolve(log, b)))


def export(
    session: SessionArg,
    path: Annotated[Path, typer.Argument(help="File to write the session's stored event bytes to.", show_default=False)],
    to: Annotated[Optional[int], typer.Option("--to", min=0, show_default=False, help="Only up to this seq.")] = None,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Write a session's events, byte for byte, to a file (for fixtures, bug reports, archives)."""
    if path.is_dir():
        raise UserError(f"{path} is a directory: name the file to write, e.g. {path / 'session.avro'}")
    log = reader(bus, db)
    emit(export_command(log, resolve(log, session), path, to))


def rollback(
    session: SessionArg,
    to: Annotated[Optional[int], typer.Option("--to", min=0, show_default=False, help="Event seq: restore the workspace as it was right after it.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(show_default=False, help="Restore this checkpoint commit instead (the one a rollback printed, to undo it); starts no session.")] = None,
    workdir: Annotated[Optional[Path], typer.Option(show_default=False, help="Where the workspace is now, if it moved since the run.")] = None,
    no_fork: Annotated[bool, typer.Option("--no-fork", help="Only restore the files; start no new session.")] = False,
    yes: YesOpt = False,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Restore a session's workspace as it was right after event SEQ (from the checkpoints taken
    before each write) and fork a new session from SEQ. It shows the files it would change and
    asks first (--yes: do not ask); the current files are checkpointed first, and it prints
    the command that undoes it."""
    if (to is None) == (checkpoint is None):
        raise UserError("say where to roll back to: --to SEQ, or --checkpoint COMMIT")
    log = writer(bus, db)
    sid = resolve(log, session)
    try:
        if checkpoint is not None:
            confirm(yes, f"restore the workspace of session {sid} to checkpoint {checkpoint}")
            result = restore_checkpoint(log, sid, checkpoint, workdir=workdir)
        else:
            plan = plan_rollback(log, sid, to, workdir=workdir)
            if plan.changes:
                output.note(plan.describe())
                confirm(yes, f"roll back {plan.workdir}")
            result = roll_back(log, sid, to, workdir=workdir, fork_session=not no_fork)
    except (RollbackError, CheckpointError) as exc:
        raise UserError(str(exc)) from None
    output.answer(result.describe())
    if result.restore is not None:
        output.note(Styled("undo it with:", "dim"), f" loopstream rollback {sid} --checkpoint "
                    f"{result.restore.backup_commit[:12]} --yes" + (f" --workdir {workdir}" if workdir else ""))
    if result.fork_session_id:
        output.note(Styled("continue it with:", "dim"), f" loopstream resume {result.fork_session_id} --allow-writes")


def confirm(yes: bool, what: str) -> None:
    """Ask before changing files; refuse where nobody can answer, unless --yes."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise UserError(f"{what}? nobody to ask here: pass --yes to confirm")
    if not typer.confirm(output.safe(f"{what}?"), default=False, err=True):
        raise typer.Exit(1)
