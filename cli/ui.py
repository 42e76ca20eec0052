"""`loopstream ui`: the web inspector and its HTTP API (docs/inspector.md), over a SQLite log."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from loopstream.cli import output
from loopstream.cli.common import DbOpt, UserError
from loopstream.cli.run import check_script_tools, select_tools, session_policy_for
from loopstream.kafka.bus import default_db


def ui(
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8765,
    token: Annotated[Optional[str], typer.Option(envvar="LOOPSTREAM_UI_TOKEN", show_default=False, help="Bearer token the API requires (needed off loopback; at least 16 characters). Open the page as URL/?token=TOKEN.")] = None,
    provider: Annotated[Optional[str], typer.Option(envvar="LOOPSTREAM_PROVIDER", show_default=False, help="Provider of goals started from the page (default: chosen from the environment).")] = None,
    model: Annotated[Optional[str], typer.Option(envvar="LOOPSTREAM_MODEL", show_default=False, help="Model of goals started from the page.")] = None,
    tools: Annotated[Optional[str], typer.Option(show_default=False, help="Comma-separated tool names for goals started from the page (default: all read-only built-ins).")] = None,
    policy: Annotated[Optional[Path], typer.Option(show_default=False, help="TOML policy file for goals started from the page.")] = None,
    allow_model: Annotated[Optional[list[str]], typer.Option(show_default=False, help="A model a request may choose for its goal (repeatable; default: none, every goal runs on --model).")] = None,
    max_steps: Annotated[int, typer.Option(min=1, help="Model steps before a started session fails.")] = 12,
    workdir: Annotated[Path, typer.Option(help="Directory the file tools of started sessions may read.")] = Path("."),
    db: DbOpt = None,
) -> None:
    """Serve the web inspector: sessions, timelines, fork trees, diffs, live updates, approvals."""
    try:
        from loopstream.web.app import ServerSettings, create_app
        from loopstream.web.guard import BindError, check_bind
        from loopstream.web.runner import RunSettings
        from loopstream.web.serve import ServeError, bind, server_for, url_of
    except ImportError:
        raise UserError("loopstream ui needs the ui extra: pip install 'loopstream[ui]'") from None
    try:
        check_bind(host, token)
    except BindError as exc:
        raise UserError(str(exc)) from None
    if not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is not a directory")
    _, names = select_tools(tools, False)
    check_script_tools(provider, model, names)
    run = RunSettings(db=db or default_db(), provider=provider, model=model, tools=names, max_steps=max_steps,
                      models=tuple(allow_model or ()),
                      workdir=workdir, policy=session_policy_for(max_tokens=None, max_seconds=None,
                                                                 context_budget=None, policy=policy))
    app = create_app(run, ServerSettings(host=host, token=token))
    try:
        sock = bind(host, port)
    except ServeError as exc:
        raise UserError(str(exc)) from None
    output.note(f"loopstream inspector on {url_of(sock)}/ · log {run.db} · Ctrl-C stops it")
    server_for(app).run(sockets=[sock])
