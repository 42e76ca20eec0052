"""The `loopstream` command line."""
from __future__ import annotations

import datetime as dt
import getpass
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loopstream.core import events as ev
from loopstream.core.describe import short, status_of, summarize
from loopstream.core.log import Log, LogError, SessionNotFound
from loopstream.core.sampling import DEFAULT_MAX_OUTPUT_TOKENS, DEFAULT_TEMPERATURE, SamplingError, sampling_from
from loopstream.kafka.bus import BusError, open_log

app = typer.Typer(
    help="loopstream: an agent harness whose every step is an Avro event in a log "
    "(embedded SQLite by default, Kafka when one machine is not enough).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Wide when piped (rich would wrap at 80 columns and break lines mid-payload).
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

DbOpt = Annotated[Optional[Path], typer.Option("--db", help="SQLite log file [env LOOPSTREAM_DB; default ./.loopstream/loopstream.db]", show_default=False)]
BusOpt = Annotated[Optional[str], typer.Option("--bus", help="sqlite:///PATH or kafka://HOST:PORT [env LOOPSTREAM_BUS]", show_default=False)]


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2."""


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)  # the text may hold [brackets]
    raise typer.Exit(code)


def _resolve(log: Log, session: str) -> str:
    find = getattr(log, "find_session", None)
    matches = find(session) if find else [session]
    if session in matches or (not find and log.next_seq(session)):
        return session
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise SessionNotFound(session)
    raise UserError(f"session prefix {session!r} is ambiguous: {', '.join(matches[:5])}")


def _progress(event: ev.Event) -> None:
    colors = {"ModelResponded": "cyan", "ToolCompleted": "green", "ToolFailed": "yellow",
              "ModelFailed": "yellow", "SessionFailed": "red", "SessionFinished": "bold green"}
    color = colors.get(event.type, "dim")
    err.print(f"  [{color}]{event.seq:>3} {event.type:<16}[/] {summarize(event, 100)}", highlight=False)


@app.command()
def run(
    goal: Annotated[str, typer.Argument(help="What the agent should do.")],
    model: Annotated[Optional[str], typer.Option(help="Model name [env LOOPSTREAM_MODEL]. Default: the local Qwen2.5-Coder-0.5B when no API key is set.")] = None,
    provider: Annotated[Optional[str], typer.Option(help="anthropic | openai | local | scripted [env LOOPSTREAM_PROVIDER]. Default: chosen from the environment.")] = None,
    base_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible server URL [env OPENAI_BASE_URL].")] = None,
    action_mode: Annotated[Optional[str], typer.Option(help="native | json_schema | json_text: how the model writes tool calls.")] = None,
    tools: Annotated[Optional[str], typer.Option(help="Comma-separated tool names. Default: all built-in tools.")] = None,
    max_steps: Annotated[int, typer.Option(min=1, help="Model steps before the session fails.")] = 12,
    max_tokens: Annotated[Optional[int], typer.Option(min=1, help="Token budget (input + output) for the session.")] = None,
    max_seconds: Annotated[Optional[float], typer.Option(min=0.1, help="Wall-time budget for the session.")] = None,
    rpm: Annotated[Optional[float], typer.Option(min=0.1, help="Client-side limit: model requests per minute.")] = None,
    tpm: Annotated[Optional[float], typer.Option(min=1, help="Client-side limit: model tokens per minute.")] = None,
    policy: Annotated[Optional[Path], typer.Option(help="TOML policy file (docs/policy.md): permissions (allow/deny/ask per tool and argument), guardrails, budgets, retries, ….")] = None,
    context_budget: Annotated[Optional[int], typer.Option(min=64, help="Context size in tokens above which older turns are summarized (compaction).")] = None,
    fallback_model: Annotated[Optional[list[str]], typer.Option(help="A model to switch to when the current one keeps failing (repeatable, in order).")] = None,
    workdir: Annotated[Path, typer.Option(help="Directory the file tools may read.")] = Path("."),
    allow_writes: Annotated[bool, typer.Option("--allow-writes", help="Also give the model write_file, edit_file and shell in --workdir (the workspace is checkpointed before each; undo with `loopstream rollback`).")] = False,
    system_prompt: Annotated[Optional[Path], typer.Option(help="File with a system prompt to use instead of the default.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature, 0 to 2 (sent on every model call; recorded in the session).")] = DEFAULT_TEMPERATURE,
    max_output_tokens: Annotated[int, typer.Option(help="Cap on the tokens of one model reply.")] = DEFAULT_MAX_OUTPUT_TOKENS,
    stop: Annotated[Optional[list[str]], typer.Option(help="A text that ends a model reply where it appears (repeatable, at most 4).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not print progress.")] = False,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Run an agent on GOAL until it answers; print progress, the answer and the session id."""
    from loopstream.providers.ratelimit import RateLimiter
    from loopstream.runtime.assembly import DEFAULT_SYSTEM_PROMPT, build_runtime, open_model
    from loopstream.runtime.inline import SessionConfig
    from loopstream.tools.builtin import default_registry

    try:
        sampling = sampling_from({"temperature": temperature, "max_output_tokens": max_output_tokens,
                                  "stop": stop or []}, where="run")
    except SamplingError as exc:
        raise UserError(f"--{exc.setting.replace('_', '-')}: {exc.reason}") from None
    registry = default_registry(allow_writes=allow_writes)
    names = [t.strip() for t in tools.split(",") if t.strip()] if tools else registry.names()
    _need_writes(names, allow_writes)
    try:
        registry = registry.select(names)
    except KeyError as exc:
        raise UserError(str(exc.args[0])) from None
    if not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is not a directory")
    prompt = DEFAULT_SYSTEM_PROMPT
    if system_prompt is not None:
        try:
            prompt = system_prompt.read_text()
        except OSError as exc:
            raise UserError(f"cannot read --system-prompt {system_prompt}: {exc.strerror}") from None
    session_policy = _policy(policy, max_tokens, max_seconds, context_budget)  # a bad file: before any log opens
    log = open_log(bus, db)
    announce = None if quiet else lambda: err.print("[dim]starting the local model (llama.cpp, Qwen2.5-Coder-0.5B)…[/]")
    if allow_writes and (excluded := _log_inside(log, workdir)):  # never snapshot (nor restore) the log itself
        session_policy = session_policy.updated({"checkpoint_exclude": [*session_policy.checkpoint_exclude,
                                                                        *excluded]})
    with ExitStack() as stack:
        chosen = stack.enter_context(open_model(provider, model, base_url, action_mode, on_local_start=announce))
        backups = [stack.enter_context(open_model(provider, m, base_url, action_mode)) for m in fallback_model or []]
        if backups:
            session_policy = session_policy.updated({"fallback_models": [b.model for b in backups]})
        limits = {p.name: RateLimiter(rpm, tpm) for p in [chosen, *backups]} if rpm or tpm else None
        runtime = build_runtime(log, chosen, registry, on_event=None if quiet else _progress, fallbacks=backups,
                                limits=limits)
        config = SessionConfig(
            provider=chosen.name, model=chosen.model, tools=names, system_prompt=prompt,
            max_steps=max_steps, workdir=str(workdir.resolve()), policy=session_policy, sampling=sampling,
        )
        sid = runtime.start_session(goal, config)
        if not quiet:
            err.print(f"[dim]session {sid} · {chosen.name}:{chosen.model} · log {getattr(log, 'path', bus)}[/]")
        state = _drive(runtime, sid, quiet)
    _finish(sid, state)


def _policy(path: Optional[Path], max_tokens: Optional[int], max_seconds: Optional[float],
            context_budget: Optional[int]):
    """The session's policy: the --policy file, then the budget flags over it."""
    from loopstream.core.policy import PolicyError, SessionPolicy, load_policy

    budgets = {k: v for k, v in (("max_tokens", max_tokens), ("max_wall_seconds", max_seconds)) if v}
    compaction = {"context_budget_tokens": context_budget} if context_budget else {}
    try:
        from_file = load_policy(path) if path is not None else SessionPolicy()
        return from_file.updated({"budgets": budgets, "compaction": compaction}, "command line")
    except PolicyError as exc:
        raise UserError(str(exc)) from None


def _drive(runtime, sid: str, quiet: bool):
    """Run a session; while it waits for a person's approval, say how to give it and wait
    for `loopstream approve` / `deny` from another process (Ctrl-C leaves it resumable)."""
    shown: set[str] = set()
    while True:
        state = runtime.run_session(sid)
        if state.status != "awaiting_approval":
            return state
        for call_id, reason in state.open_approvals.items():
            if call_id not in shown:
                shown.add(call_id)
                call = state.pending_calls[call_id].call if call_id in state.pending_calls else None
                what = f"{call.name}({json.dumps(call.arguments)})" if call else call_id
                err.print(f"[bold yellow]waiting for approval[/] of {what} ({reason})\n"
                          f"  approve: loopstream approve {sid} {call_id}\n"
                          f"  deny:    loopstream deny {sid} {call_id} --reason '…'", highlight=False)
        while runtime.load(sid).status == "awaiting_approval":
            time.sleep(0.3)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _finish(sid: str, state) -> None:
    """Print the outcome of a run: the answer on stdout (exit 0), or the reason (exit 1)."""
    if state.status == "done":
        out.print(state.answer or "", highlight=False)
        err.print(f"[dim]session[/] {sid} [dim]· {_count(state.step, 'step')} · "
                  f"{_count(state.tool_calls, 'tool call')} · {state.input_tokens}+{state.output_tokens} tokens[/]",
                  highlight=False)
        return
    _fail(f"session {sid} {state.status}: {state.error or 'stopped in state ' + state.status}", 1)


def _need_writes(names: list[str], allow_writes: bool) -> None:
    from loopstream.tools.workspace import TOOLS as SIDE_EFFECT_TOOLS

    asked = [n for n in names if n in {t.name for t in SIDE_EFFECT_TOOLS}]
    if asked and not allow_writes:
        raise UserError(f"{', '.join(asked)} change the workspace: pass --allow-writes to enable them")


def _log_inside(log: Log, workdir: Path) -> list[str]:
    """gitignore patterns for the SQLite log's files when they live inside `workdir`."""
    path = getattr(log, "path", None)
    if path is None:
        return []
    path, root = Path(path).resolve(), workdir.resolve()
    if root not in path.parents or path.relative_to(root).parts[0] == ".loopstream":  # never snapshotted anyway
        return []
    rel = path.relative_to(root).as_posix()
    return [f"/{rel}", f"/{rel}-wal", f"/{rel}-shm", f"/{rel}-journal"]


@app.command()
def resume(
    session: Annotated[str, typer.Argument(help="Session id (a unique prefix is enough).")],
    model: Annotated[Optional[str], typer.Option(help="Model for the remaining steps (default: the session's own).")] = None,
    provider: Annotated[Optional[str], typer.Option(help="anthropic | openai | local | scripted (default: the session's own).")] = None,
    base_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible server URL.")] = None,
    action_mode: Annotated[Optional[str], typer.Option(help="native | json_schema | json_text.")] = None,
    allow_writes: Annotated[bool, typer.Option("--allow-writes", help="Needed when the session was started with write_file, edit_file or shell.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not print progress.")] = False,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Continue a session that was interrupted (crash, Ctrl-C, lost connection) from its log."""
    from loopstream.runtime.assembly import build_runtime, open_model
    from loopstream.runtime.writer import SessionWriter
    from loopstream.tools.builtin import default_registry

    log = open_log(bus, db)
    sid = _resolve(log, session)
    state = SessionWriter(log).load(sid)
    if state.terminal:
        raise UserError(f"session {sid} already ended ({state.status}); to continue from an earlier point: "
                        f"loopstream fork {sid} --at SEQ")
    _need_writes(state.tools, allow_writes)
    if provider is None and model is None:  # the session's own model (a fork may have changed it)
        provider, model = state.provider, state.model
    announce = None if quiet else lambda: err.print("[dim]starting the local model…[/]")
    with open_model(provider, model, base_url, action_mode, on_local_start=announce) as chosen:
        runtime = build_runtime(log, chosen, default_registry(allow_writes=allow_writes),
                                on_event=None if quiet else _progress)
        state = _drive(runtime, sid, quiet)
    _finish(sid, state)


@app.command()
def rollback(
    session: Annotated[str, typer.Argument(help="Session id (a unique prefix is enough).")],
    to: Annotated[int, typer.Option("--to", min=0, help="Event seq: restore the workspace as it was right after it.")],
    workdir: Annotated[Optional[Path], typer.Option(help="Where the workspace is now, if it moved since the run.")] = None,
    no_fork: Annotated[bool, typer.Option("--no-fork", help="Only restore the files; start no new session.")] = False,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Restore a session's workspace as it was right after event SEQ (from the checkpoints taken
    before each write; the current files are checkpointed first) and fork a new session from SEQ."""
    from loopstream.replay.rollback import RollbackError
    from loopstream.replay.rollback import rollback as roll_back
    from loopstream.tools.checkpoint import CheckpointError

    log = open_log(bus, db)
    sid = _resolve(log, session)
    try:
        result = roll_back(log, sid, to, workdir=workdir, fork_session=not no_fork)
    except (RollbackError, CheckpointError) as exc:
        raise UserError(str(exc)) from None
    out.print(result.describe(), highlight=False)
    if result.fork_session_id:
        err.print(f"[dim]continue it with:[/] loopstream resume {result.fork_session_id} --allow-writes",
                  highlight=False)


def _decide(session: str, call_id: Optional[str], approved: bool, reason: str,
            db: Optional[Path], bus: Optional[str]) -> None:
    from loopstream.runtime.writer import SessionWriter

    log = open_log(bus, db)
    sid = _resolve(log, session)
    writer = SessionWriter(log)
    state = writer.load(sid)
    if not state.open_approvals:
        raise UserError(f"session {sid} is not waiting for an approval (it is {state.status})")
    if call_id is None:
        if len(state.open_approvals) > 1:
            raise UserError(f"session {sid} waits on several calls; name one: {', '.join(state.open_approvals)}")
        call_id = next(iter(state.open_approvals))
    if call_id not in state.open_approvals:
        raise UserError(f"call {call_id!r} is not waiting for approval; waiting: {', '.join(state.open_approvals)}")
    by = f"person:{getpass.getuser()}"
    written = writer.record(sid, [ev.ApprovalDecided(call_id=call_id, approved=approved, by=by, reason=reason)],
                            actor=by, key=call_id)
    if written.outcome == "dropped":
        raise UserError(f"call {call_id!r} of session {sid} was decided by someone else meanwhile")
    verb = "approved" if approved else "denied"
    out.print(f"{verb} {call_id} of session {sid}; a waiting `loopstream run` continues by itself, "
              f"otherwise: loopstream resume {sid}", highlight=False)


@app.command()
def approve(
    session: Annotated[str, typer.Argument(help="Session id (a unique prefix is enough).")],
    call_id: Annotated[Optional[str], typer.Argument(help="The tool call to approve (default: the only one waiting).")] = None,
    note: Annotated[str, typer.Option(help="Why, for the record.")] = "",
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Approve a tool call that a permission rule sent to a person (works from any process)."""
    _decide(session, call_id, True, note, db, bus)


@app.command()
def deny(
    session: Annotated[str, typer.Argument(help="Session id (a unique prefix is enough).")],
    call_id: Annotated[Optional[str], typer.Argument(help="The tool call to deny (default: the only one waiting).")] = None,
    reason: Annotated[str, typer.Option(help="Told to the model.")] = "",
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Deny a tool call waiting for approval; the model is told and continues without it."""
    _decide(session, call_id, False, reason, db, bus)


@app.command()
def cancel(
    session: Annotated[str, typer.Argument(help="Session id (a unique prefix is enough).")],
    reason: Annotated[str, typer.Option(help="Recorded in the SessionCancelled event.")] = "cancelled by a person",
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Cancel a session that has not ended."""
    from loopstream.runtime.writer import SessionWriter

    log = open_log(bus, db)
    sid = _resolve(log, session)
    writer = SessionWriter(log)
    if (state := writer.load(sid)).terminal:
        raise UserError(f"session {sid} already ended ({state.status})")
    by = f"person:{getpass.getuser()}"
    if writer.record(sid, [ev.SessionCancelled(reason=reason)], actor=by).outcome == "dropped":
        raise UserError(f"session {sid} ended meanwhile")
    out.print(f"cancelled session {sid}")


def _emit(result) -> None:
    """Print a replay/fork/diff CommandResult and exit with its code."""
    if result.text:
        out.print(result.text, highlight=False, markup=False)
    if result.exit_code:
        if result.error:
            err.print(f"[bold red]error:[/] {result.error}", highlight=False)
        raise typer.Exit(result.exit_code)


@app.command()
def replay(
    session: Annotated[str, typer.Argument(help="Session id (a unique prefix is enough).")],
    to: Annotated[Optional[int], typer.Option("--to", min=0, help="Replay only up to this seq.")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Only check the hash chain.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Re-drive the orchestrator with this code and report the first decision that differs from the log.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable report.")] = False,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Rebuild a session from its log alone (no model or tool calls): the timeline of
    turns, tool calls, tokens, latencies and errors, with the hash chain verified.
    Exits 1 with the first bad seq if an event was altered."""
    from loopstream.replay.commands import check_command, replay_command

    log = open_log(bus, db)
    sid = _resolve(log, session)
    _emit(check_command(log, sid, to) if check else replay_command(log, sid, to, verify_only=verify, as_json=as_json))


@app.command()
def fork(
    session: Annotated[str, typer.Argument(help="Session id (a unique prefix is enough).")],
    at: Annotated[int, typer.Option("--at", min=0, help="The last parent event the child keeps.")],
    model: Annotated[Optional[str], typer.Option(help="Model for the child's next steps.")] = None,
    provider: Annotated[Optional[str], typer.Option(help="Provider for the child (recorded; used by resume).")] = None,
    system_prompt: Annotated[Optional[Path], typer.Option(help="File with a new system prompt for the child.")] = None,
    tools: Annotated[Optional[str], typer.Option(help="Comma-separated tools for the child.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="New step budget.")] = None,
    message: Annotated[Optional[str], typer.Option(help="A new user message the child starts from.")] = None,
    reason: Annotated[str, typer.Option(help="Why, recorded in SessionForked.")] = "",
    yes: Annotated[bool, typer.Option("--yes", help="Acknowledge the parent's side effects after --at that the fork does not undo.")] = False,
    allow_writes: Annotated[bool, typer.Option("--allow-writes", help="Classify write_file/edit_file/shell as known tools.")] = False,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Start a new session from a parent's events up to --at, optionally with another
    model, prompt, tools or a new message; continue it with `loopstream resume CHILD`."""
    from loopstream.replay.commands import fork_command
    from loopstream.replay.fork import ForkError
    from loopstream.tools.builtin import default_registry

    prompt = None
    if system_prompt is not None:
        try:
            prompt = system_prompt.read_text()
        except OSError as exc:
            raise UserError(f"cannot read --system-prompt {system_prompt}: {exc.strerror}") from None
    log = open_log(bus, db)
    sid = _resolve(log, session)
    names = [t.strip() for t in tools.split(",") if t.strip()] if tools else None
    try:
        result = fork_command(log, sid, at, model=model, provider=provider, system_prompt=prompt, tools=names,
                              max_steps=max_steps, message=message, reason=reason, yes=yes,
                              registry=default_registry(allow_writes=allow_writes))
    except ForkError as exc:
        raise UserError(str(exc)) from None
    _emit(result)


@app.command()
def diff(
    a: Annotated[str, typer.Argument(help="First session (e.g. the parent).")],
    b: Annotated[str, typer.Argument(help="Second session (e.g. its fork).")],
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Where two sessions diverge, and how their outcomes, tokens and steps compare (exit 1 if they differ)."""
    from loopstream.replay.commands import diff_command

    log = open_log(bus, db)
    _emit(diff_command(log, _resolve(log, a), _resolve(log, b)))


@app.command()
def export(
    session: Annotated[str, typer.Argument(help="Session id (a unique prefix is enough).")],
    path: Annotated[Path, typer.Argument(help="File to write the session's stored event bytes to.")],
    to: Annotated[Optional[int], typer.Option("--to", min=0, help="Only up to this seq.")] = None,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Write a session's events, byte for byte, to a file (for fixtures, bug reports, archives)."""
    from loopstream.replay.commands import export_command

    log = open_log(bus, db)
    _emit(export_command(log, _resolve(log, session), path, to))


@app.command()
def sessions(db: DbOpt = None, bus: BusOpt = None,
             limit: Annotated[int, typer.Option(help="Show the newest N sessions.")] = 50) -> None:
    """List the sessions in the log, newest last."""
    log = open_log(bus, db)
    infos = log.sessions()[-limit:]
    if not infos:
        err.print("no sessions yet: start one with `loopstream run \"GOAL\"`")
        return
    table = Table("session", "started", "status", "events", "goal", box=None, header_style="bold")
    for info in infos:
        goal = ""
        head = log.read(info.session_id, 0, 1)
        for e in head:
            if isinstance(e.payload, ev.GoalReceived):
                goal = e.payload.text
        table.add_row(info.session_id, _time(info.created_ms, date=True), status_of(info.last_type),
                      str(info.next_seq), short(goal, 60))
    out.print(table)


@app.command()
def show(
    session: Annotated[str, typer.Argument(help="Session id (a unique prefix is enough).")],
    db: DbOpt = None,
    bus: BusOpt = None,
    width: Annotated[int, typer.Option(help="Width of the payload column.")] = 90,
) -> None:
    """Print a session's event timeline: seq, time, type, actor, payload."""
    log = open_log(bus, db)
    sid = _resolve(log, session)
    events = log.read(sid)
    table = Table("seq", "time", "type", "actor", "payload", box=None, header_style="bold")
    for e in events:
        table.add_row(str(e.seq), _time(e.time), e.type, e.actor, summarize(e, width))
    out.print(f"session {sid}", highlight=False)
    out.print(table)


@app.command()
def worker(
    role: Annotated[str, typer.Option(help="orchestrator | model | tool | all (one consumer group each).")] = "all",
    bus: BusOpt = None,
    db: DbOpt = None,
    model: Annotated[Optional[str], typer.Option(help="Model for the model role (as for `run`); recorded in sessions the orchestrator starts; for the tool role, the reviewer of tool calls when guardrails ask for review.")] = None,
    provider: Annotated[Optional[str], typer.Option(help="anthropic | openai | local | scripted (as for `run`).")] = None,
    base_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible server URL.")] = None,
    action_mode: Annotated[Optional[str], typer.Option(help="native | json_schema | json_text.")] = None,
    fallback_model: Annotated[Optional[list[str]], typer.Option(help="As for `run` (repeatable, in order); give the orchestrator the same ones: it records them in the sessions it starts.")] = None,
    rpm: Annotated[Optional[float], typer.Option(min=0.1, help="Client-side limit of this process: model requests per minute.")] = None,
    tpm: Annotated[Optional[float], typer.Option(min=1, help="Client-side limit of this process: model tokens per minute.")] = None,
    group_prefix: Annotated[Optional[str], typer.Option(help="Consumer groups are PREFIX.<role> (default: the bus's topic prefix, `loopstream`).")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Handlers running at once (threads).")] = 8,
    agents: Annotated[Optional[Path], typer.Option(help="JSON file {name: {SessionConfig fields}}: agent configs goals may name.")] = None,
    allow_writes: Annotated[bool, typer.Option("--allow-writes", help="Let the tool role run write_file, edit_file and shell (checkpointed before each).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not print each appended event.")] = False,
) -> None:
    """Run processors as an independent worker over the log until SIGTERM/SIGINT (Kafka: see
    docs/architecture.md#kafka). The orchestrator role also takes goals and publishes results."""
    import logging

    from loopstream.kafka import roles
    from loopstream.kafka.contract import ContractError
    from loopstream.runtime.assembly import AgentsFileError

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=f"%(asctime)s {role} %(levelname)s %(message)s")
    logging.getLogger("loopstream").setLevel(logging.WARNING if quiet else logging.INFO)

    def show_event(e: ev.Event) -> None:
        err.print(f"  [dim]{e.session_id[:8]}[/] {e.seq:>3} {e.type:<16} {summarize(e, 90)}", highlight=False)

    def ready(w, intake) -> None:
        err.print(f"[dim]worker {w.group}: {', '.join(p.name for p in w.processors)}"
                  f"{' + goal intake ' + intake.group if intake else ''}[/]", highlight=False)

    opts = roles.WorkerOptions(role=role, bus=bus, db=db, provider=provider, model=model, base_url=base_url,
                               action_mode=action_mode, fallback_models=tuple(fallback_model or ()), rpm=rpm, tpm=tpm,
                               group_prefix=group_prefix, concurrency=concurrency,
                               agents_file=agents, on_event=None if quiet else show_event,
                               allow_writes=allow_writes)
    try:
        w = roles.run_role(opts, on_ready=ready)
    except (ContractError, AgentsFileError) as exc:
        raise UserError(str(exc)) from None
    err.print(f"[dim]worker {w.group} stopped: {w.stats.snapshot()}[/]", highlight=False)


@app.command()
def submit(
    goal: Annotated[str, typer.Argument(help="What the agent should do.")],
    bus: BusOpt = None,
    db: DbOpt = None,
    agent: Annotated[str, typer.Option(help="Agent configuration the workers know.")] = "default",
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and print the answer.")] = False,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds --wait waits.")] = 300.0,
    idempotency_key: Annotated[Optional[str], typer.Option(help="The same key never starts a second session (default: random).")] = None,
    correlation_id: Annotated[Optional[str], typer.Option(help="Correlation id for the session's events and updates (default: the key).")] = None,
    reply_topic: Annotated[Optional[str], typer.Option(help="Topic for the updates (default: <prefix>.results).")] = None,
    progress: Annotated[bool, typer.Option("--progress", help="Ask for per-step progress updates (printed with --wait).")] = False,
    model: Annotated[Optional[str], typer.Option(help="SQLite bus only: model recorded in the session.")] = None,
    provider: Annotated[Optional[str], typer.Option(help="SQLite bus only: provider recorded in the session.")] = None,
) -> None:
    """Hand GOAL to the workers: a Goal record on the goals topic (Kafka), or a new session in
    the log (SQLite). Prints the session id, or with --wait the answer."""
    import os

    from loopstream.kafka import submit as submit_mod
    from loopstream.kafka.contract import ContractError, Goal
    from loopstream.runtime.assembly import AgentsFileError, default_agents

    bus = bus or os.environ.get("LOOPSTREAM_BUS") or None
    record = Goal(goal=goal, agent=agent, idempotency_key=idempotency_key, correlation_id=correlation_id,
                  reply_topic=reply_topic, progress=progress)
    try:
        if bus and bus.startswith("kafka://"):
            def on_progress(u) -> None:
                err.print(f"  [dim]{u.seq:>3} {u.event_type:<16}[/] {u.detail or ''}", highlight=False)

            done = submit_mod.submit_goal(bus, record, wait=wait, timeout=timeout, on_progress=on_progress)
            sid, result = done.session_id, done.result
            status, answer, error = (result.status, result.answer, result.error) if result else ("", None, None)
        else:
            log = open_log(bus, db)
            config = default_agents(provider or "any", model or "default").get(agent)
            if config is None:
                raise UserError(f"unknown agent {agent!r} (a SQLite submit knows `default` only)")
            sid = submit_mod.start_local(log, record, config)
            state = submit_mod.wait_local(log, sid, timeout) if wait else None
            status, answer, error = (state.status, state.answer, state.error) if state else ("", None, None)
    except (ContractError, AgentsFileError) as exc:
        raise UserError(str(exc)) from None
    if not wait:
        out.print(sid, highlight=False)
        return
    if status == "done":
        out.print(answer or "", highlight=False)
        err.print(f"[dim]session[/] {sid}", highlight=False)
        return
    _fail(f"session {sid} {status}: {error or ''}", 1)


def _time(ms: int, date: bool = False) -> str:
    t = dt.datetime.fromtimestamp(ms / 1000)
    return t.strftime("%Y-%m-%d %H:%M:%S") if date else t.strftime("%H:%M:%S.%f")[:-3]


def main() -> None:
    """Entry point: user mistakes print one line (exit 2); failures of a run exit 1."""
    from loopstream.core.codec import CodecError

    try:
        from loopstream.providers.errors import ProviderConfigError
    except ImportError:  # pragma: no cover
        ProviderConfigError = UserError  # type: ignore[misc,assignment]
    try:
        app()
    except (UserError, BusError, SessionNotFound, ProviderConfigError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except (LogError, CodecError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted: every step so far is in the log; `loopstream resume SESSION` continues it")
        sys.exit(130)


if __name__ == "__main__":
    main()
