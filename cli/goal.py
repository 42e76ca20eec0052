"""`loopstream goal status|pause|resume|stop SESSION`: control a goal-mode (or any) session
from any terminal. A pause is an event in the log (GoalPaused), so it survives restarts;
`resume` records GoalResumed and drives the session on in this terminal."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from loopstream.cli import output
from loopstream.cli.common import BusOpt, DbOpt, QuietOpt, SessionArg, resolve, writer
from loopstream.cli.run import ModelChoice, report, resume_agent, watch
from loopstream.cli.run import run as run_cmd
from loopstream.runtime.decisions import cancel as cancel_session
from loopstream.runtime.decisions import load, pause, resume_paused

goal_app = typer.Typer(help="Control a long-running goal: status, pause, resume, stop.", no_args_is_help=True,
                       rich_markup_mode=None, add_completion=False)


@goal_app.command()
def start(
    objective: Annotated[str, typer.Argument(help="What the agent should achieve.", show_default=False)],
    verify: Annotated[str, typer.Option(help="Shell command that checks the work (exit code 0: reached); runs in the sandbox, in --workdir.", show_default=False)],
    max_iterations: Annotated[int, typer.Option(min=1, help="Failed verifications before the goal fails.")] = 10,
    max_steps: Annotated[int, typer.Option(min=1, help="Model steps before the goal fails.")] = 50,
    max_seconds: Annotated[Optional[float], typer.Option(min=0.1, show_default=False, help="Wall-time budget (default: none).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(min=1, show_default=False, help="Token budget (default: none).")] = None,
    tools: Annotated[str, typer.Option(help="Comma-separated tool names.")] = "read_file,list_dir,grep,write_file,edit_file,shell",
    workdir: Annotated[Path, typer.Option(help="The directory the agent works in.")] = Path("."),
    model: Annotated[Optional[str], typer.Option(envvar="LOOPSTREAM_MODEL", show_default=False, help="Model name.")] = None,
    provider: Annotated[Optional[str], typer.Option(envvar="LOOPSTREAM_PROVIDER", show_default=False, help="anthropic | openai | local | scripted.")] = None,
    sandbox: Annotated[Optional[str], typer.Option(show_default=False, help="workspace-write (default), read-only, full or none.")] = None,
    network: Annotated[bool, typer.Option("--network", help="Give shell the network.")] = False,
    policy: Annotated[Optional[Path], typer.Option(show_default=False, help="TOML policy file.")] = None,
    context_budget: Annotated[Optional[int], typer.Option(min=64, show_default=False, help="Context size in tokens above which older turns are summarized.")] = None,
    quiet: QuietOpt = False,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Work on OBJECTIVE until --verify passes (`run --goal-verify` with goal defaults: the
    side-effect tools, 50 steps)."""
    run_cmd(goal=objective, model=model, provider=provider, tools=tools, max_steps=max_steps, max_tokens=max_tokens,
            max_seconds=max_seconds, policy=policy, context_budget=context_budget, workdir=workdir,
            allow_writes=True, sandbox=sandbox, network=network, goal_verify=verify,
            goal_max_iterations=max_iterations, quiet=quiet, db=db, bus=bus)


@goal_app.command()
def status(session: SessionArg, db: DbOpt = None, bus: BusOpt = None) -> None:
    """Where a session stands: state, goal iteration, last verification, steps, tool calls, tokens."""
    log = writer(bus, db)
    sid = resolve(log, session)
    s = load(log, sid)
    verify = s.policy.goal.verify_command
    lines = [f"session {sid}: {s.status}" + (" (pause pending)" if s.pause_pending else ""),
             f"goal: {s.goal[:200]!r}"]
    if verify:
        lines.append(f"verify: {verify!r}; iteration {s.goal_iterations} of at most {s.policy.goal.max_iterations}; "
                     f"last verification: {s.last_verification or 'none yet'}")
    lines.append(f"steps {s.step} of {s.max_steps} · tool calls {s.tool_calls} · tokens "
                 f"{s.input_tokens}+{s.output_tokens} · sandbox {s.policy.sandbox.mode}")
    if s.status == "paused":
        lines.append(f"paused by {s.paused_by or 'someone'}; continue with: loopstream goal resume {sid}")
    output.answer("\n".join(lines))


@goal_app.command("pause")
def pause_cmd(session: SessionArg, reason: Annotated[str, typer.Option(help="Recorded in GoalPaused.")] = "",
              db: DbOpt = None, bus: BusOpt = None) -> None:
    """Pause a session: at once between steps, else after the call in flight. It stays paused
    across restarts until `loopstream goal resume`."""
    log = writer(bus, db)
    sid = resolve(log, session)
    state = pause(log, sid, reason=reason)
    when = "now" if state.status == "paused" else "at its next step (a call is in flight)"
    output.answer(f"session {sid} pauses {when}; continue with: loopstream goal resume {sid}")


@goal_app.command("resume")
def resume_cmd(
    session: SessionArg,
    allow_writes: Annotated[bool, typer.Option("--allow-writes", help="Needed when the session has write_file, edit_file or shell.")] = False,
    model: Annotated[Optional[str], typer.Option(show_default=False, help="Model for the remaining steps (default: the session's own).")] = None,
    provider: Annotated[Optional[str], typer.Option(show_default=False, help="Provider (default: the session's own).")] = None,
    detach: Annotated[bool, typer.Option("--detach", help="Only record the resume; do not drive the session here.")] = False,
    quiet: QuietOpt = False,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Resume a paused session and drive it on in this terminal (or only record it: --detach)."""
    log = writer(bus, db)
    sid = resolve(log, session)
    resume_paused(log, sid)
    if detach:
        output.answer(f"session {sid} resumed; drive it with: loopstream resume {sid}")
        return
    report(resume_agent(log, sid, ModelChoice(provider, model), allow_writes, watch(quiet, log, bus)))


@goal_app.command()
def stop(session: SessionArg, reason: Annotated[str, typer.Option(help="Recorded in SessionCancelled.")] = "goal stopped by a person",
         db: DbOpt = None, bus: BusOpt = None) -> None:
    """Stop a goal for good (SessionCancelled)."""
    log = writer(bus, db)
    sid = resolve(log, session)
    cancel_session(log, sid, reason=reason)
    output.answer(f"stopped session {sid}")
