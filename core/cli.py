"""The `loopstream` command line."""
from __future__ import annotations

import datetime as dt
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from loopstream.core import events as ev
from loopstream.core.bus import BusError, default_db, open_log
from loopstream.core.describe import status_of, summarize
from loopstream.core.log import Log, LogError, SessionNotFound

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
    err.print(f"[bold red]error:[/] {message}", highlight=False)
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
    fallback_model: Annotated[Optional[list[str]], typer.Option(help="A model to switch to when the current one keeps failing (repeatable, in order).")] = None,
    workdir: Annotated[Path, typer.Option(help="Directory the file tools may read.")] = Path("."),
    system_prompt: Annotated[Optional[Path], typer.Option(help="File with a system prompt to use instead of the default.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not print progress.")] = False,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Run an agent on GOAL until it answers; print progress, the answer and the session id."""
    from loopstream.core.agent import DEFAULT_SYSTEM_PROMPT, build_runtime, open_model
    from loopstream.core.runtime import SessionConfig
    from loopstream.tools.registry import default_registry

    registry = default_registry()
    names = [t.strip() for t in tools.split(",") if t.strip()] if tools else registry.names()
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
    log = open_log(bus, db)
    announce = None if quiet else lambda: err.print("[dim]starting the local model (llama.cpp, Qwen2.5-Coder-0.5B)…[/]")
    extra: dict = {}
    if max_tokens:
        extra["max_tokens"] = max_tokens
    if max_seconds:
        extra["max_wall_seconds"] = max_seconds
    with ExitStack() as stack:
        chosen = stack.enter_context(open_model(provider, model, base_url, action_mode, on_local_start=announce))
        backups = [stack.enter_context(open_model(provider, m, base_url, action_mode)) for m in fallback_model or []]
        if backups:
            extra["fallback_models"] = [b.model for b in backups]
        runtime = build_runtime(log, chosen, registry, on_event=None if quiet else _progress, fallbacks=backups)
        config = SessionConfig(
            provider=chosen.name, model=chosen.model, tools=names, system_prompt=prompt,
            max_steps=max_steps, workdir=str(workdir.resolve()), extra=extra,
        )
        sid = runtime.start_session(goal, config)
        if not quiet:
            err.print(f"[dim]session {sid} · {chosen.name}:{chosen.model} · log {getattr(log, 'path', bus)}[/]")
        state = runtime.run_session(sid)
    _finish(sid, state)


def _finish(sid: str, state) -> None:
    """Print the outcome of a run: the answer on stdout (exit 0), or the reason (exit 1)."""
    if state.status == "done":
        out.print(state.answer or "", highlight=False)
        err.print(f"[dim]session[/] {sid} [dim]· {state.step} steps · {state.tool_calls} tool calls · "
                  f"{state.input_tokens}+{state.output_tokens} tokens[/]", highlight=False)
        return
    _fail(f"session {sid} {state.status}: {state.error or 'stopped in state ' + state.status}", 1)


@app.command()
def resume(
    session: Annotated[str, typer.Argument(help="Session id (a unique prefix is enough).")],
    model: Annotated[Optional[str], typer.Option(help="Model for the remaining steps (default: as configured by the environment).")] = None,
    provider: Annotated[Optional[str], typer.Option(help="anthropic | openai | local | scripted.")] = None,
    base_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible server URL.")] = None,
    action_mode: Annotated[Optional[str], typer.Option(help="native | json_schema | json_text.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not print progress.")] = False,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Continue a session that was interrupted (crash, Ctrl-C, lost connection) from its log."""
    from loopstream.core.agent import build_runtime, open_model

    log = open_log(bus, db)
    sid = _resolve(log, session)
    announce = None if quiet else lambda: err.print("[dim]starting the local model…[/]")
    with open_model(provider, model, base_url, action_mode, on_local_start=announce) as chosen:
        runtime = build_runtime(log, chosen, on_event=None if quiet else _progress)
        state = runtime.run_session(sid)
    _finish(sid, state)


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
                      str(info.next_seq), summarize_text(goal, 60))
    out.print(table)


def summarize_text(text: str, width: int) -> str:
    from loopstream.core.describe import short

    return short(text, width)


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
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except (LogError, CodecError) as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted: every step so far is in the log; `loopstream resume SESSION` continues it")
        sys.exit(130)


if __name__ == "__main__":
    main()
