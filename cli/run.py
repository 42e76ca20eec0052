"""`loopstream run` and `resume`: drive a session in the foreground and print its progress."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional, get_args

import typer

from loopstream.agents import plugins as plugin_mod
from loopstream.agents.assemble import Composed, compose, recorded_mcp, registry_for_session
from loopstream.agents.mcp import McpError, McpHub
from loopstream.agents.project import ProjectError
from loopstream.cli import output
from loopstream.cli.common import (
    BusOpt,
    DbOpt,
    DurabilityOpt,
    QuietOpt,
    SessionArg,
    UserError,
    read_goal,
    read_text_file,
    resolve,
    writer,
)
from loopstream.cli.output import Styled
from loopstream.core import events as ev
from loopstream.core.describe import summarize
from loopstream.core.log import Log
from loopstream.core.policy import PolicyError, SandboxMode, SessionPolicy, load_policy
from loopstream.core.sampling import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    DEFAULT_TEMPERATURE,
    Sampling,
    SamplingError,
    sampling_from,
)
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import SessionState
from loopstream.providers.base import Provider
from loopstream.providers.local import local_model as find_local_model
from loopstream.providers.scripted import missing_tools
from loopstream.replay.inspect import show_session
from loopstream.runtime import lease
from loopstream.runtime.assembly import DEFAULT_SYSTEM_PROMPT, build_runtime, open_model, rate_limits, with_delegation
from loopstream.runtime.decisions import WaitingCall, drive, load
from loopstream.runtime.inline import Runtime, SessionConfig
from loopstream.tools.builtin import default_registry
from loopstream.tools.registry import ToolRegistry
from loopstream.tools.workspace import TOOLS as SIDE_EFFECT_TOOLS

EXIT_INTERRUPTED = 130
EXIT_PAUSED = 3  # a paused goal: not done, not failed


class LogDamaged(Exception):
    """A session fails verification (a stored event was changed or cannot be read): exit code 1."""


@dataclass
class ModelChoice:
    """The model a run asked for (None: from the environment or the session), its fallbacks and limits."""

    provider: str | None
    model: str | None
    base_url: str | None = None
    action_mode: str | None = None
    fallbacks: list[str] = field(default_factory=list)
    rpm: float | None = None
    tpm: float | None = None


@dataclass
class Outcome:
    """How a foreground run ended: `state` is None when it was interrupted (Ctrl-C)."""

    session_id: str | None
    state: SessionState | None
    ended_by: str = ""  # the actor of the event that ended the session (a person who cancelled it)


@dataclass
class Watch:
    """What the person at the terminal is shown while a session runs (None: nothing)."""

    on_event: Callable[[ev.Event], None] | None = None
    on_waiting: Callable[[str, WaitingCall], None] | None = None
    on_start: Callable[[str, Provider], None] | None = None
    on_local_model: Callable[[], None] | None = None


# -- run ---------------------------------------------------------------------------
def run(
    goal: Annotated[Optional[str], typer.Argument(help="What the agent should do.", show_default=False)] = None,
    goal_file: Annotated[Optional[Path], typer.Option(help="Read the goal from this UTF-8 file (- reads stdin).", show_default=False)] = None,
    agent: Annotated[Optional[str], typer.Option(show_default=False, help="An agent of loopstream.toml (found upward from here) or the user file: its model, prompt, tools, skills, policy and hooks; flags given override its model and provider.")] = None,
    model: Annotated[Optional[str], typer.Option(envvar="LOOPSTREAM_MODEL", show_default=False, help="Model name (default: the local Qwen2.5-Coder-0.5B when no API key is set).")] = None,
    provider: Annotated[Optional[str], typer.Option(envvar="LOOPSTREAM_PROVIDER", show_default=False, help="anthropic | openai | local | scripted (default: chosen from the environment).")] = None,
    base_url: Annotated[Optional[str], typer.Option(show_default=False, help="OpenAI-compatible server URL (default: env OPENAI_BASE_URL).")] = None,
    action_mode: Annotated[Optional[str], typer.Option(show_default=False, help="native | json_schema | json_text: how the model writes tool calls (default: env LOOPSTREAM_ACTION_MODE for other servers, else native).")] = None,
    local_model: Annotated[Optional[str], typer.Option(show_default=False, help="Run on a bundled local model: 0.5b (the default, extra [local]) or 1.5b (Qwen2.5-Coder-1.5B, extra [local-1-5b]); same as --provider local --model NAME.")] = None,
    tools: Annotated[Optional[str], typer.Option(show_default=False, help="Comma-separated tool names (default: all built-in tools).")] = None,
    max_steps: Annotated[int, typer.Option(min=1, help="Model steps before the session fails.")] = 12,
    max_tokens: Annotated[Optional[int], typer.Option(min=1, show_default=False, help="Token budget (input + output) for the session (default: none).")] = None,
    max_seconds: Annotated[Optional[float], typer.Option(min=0.1, show_default=False, help="Wall-time budget for the session (default: none).")] = None,
    rpm: Annotated[Optional[float], typer.Option(min=0.1, show_default=False, help="Client-side limit: model requests per minute (default: none).")] = None,
    tpm: Annotated[Optional[float], typer.Option(min=1, show_default=False, help="Client-side limit: model tokens per minute (default: none).")] = None,
    policy: Annotated[Optional[Path], typer.Option(show_default=False, help="TOML policy file: permission rules (allow/deny/ask per tool and argument) and guardrails.")] = None,
    context_budget: Annotated[Optional[int], typer.Option(min=64, show_default=False, help="Context size in tokens above which older turns are summarized (default: never).")] = None,
    fallback_model: Annotated[Optional[list[str]], typer.Option(show_default=False, help="A model to switch to when the current one keeps failing (repeatable, in order).")] = None,
    workdir: Annotated[Path, typer.Option(help="Directory the file tools may read.")] = Path("."),
    allow_writes: Annotated[bool, typer.Option("--allow-writes", help="Also give the model write_file, edit_file and shell in --workdir (the workspace is checkpointed before each; undo with `loopstream rollback`).")] = False,
    system_prompt: Annotated[Optional[Path], typer.Option(show_default=False, help="File with a system prompt to use instead of the default.")] = None,
    sandbox: Annotated[Optional[str], typer.Option(show_default=False, help="How shell runs: workspace-write (default: only --workdir writable), read-only, full (all writable; explicit opt-in) or none (no sandbox; explicit opt-out). Needs bubblewrap unless none.")] = None,
    network: Annotated[bool, typer.Option("--network", help="Give shell the network (default: none inside the sandbox).")] = False,
    goal_verify: Annotated[Optional[str], typer.Option(show_default=False, help="Goal mode: a shell command (run in the sandbox, in --workdir) that checks each final answer; the session is done only when it exits 0, and its output goes back to the model otherwise.")] = None,
    goal_max_iterations: Annotated[Optional[int], typer.Option(min=1, show_default=False, help="Goal mode: failed verifications before the session fails (default: 10).")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature, 0 to 2 (sent on every model call; recorded in the session).")] = DEFAULT_TEMPERATURE,
    max_output_tokens: Annotated[int, typer.Option(help="Cap on the tokens of one model reply.")] = DEFAULT_MAX_OUTPUT_TOKENS,
    stop: Annotated[Optional[list[str]], typer.Option(show_default=False, help="A text that ends a model reply where it appears (repeatable, at most 4; default: none).")] = None,
    quiet: QuietOpt = False,
    db: DbOpt = None,
    bus: BusOpt = None,
    durability: DurabilityOpt = None,
) -> None:
    """Run an agent on GOAL until it answers; print progress, the answer and the session id."""
    text = read_goal(goal, goal_file)
    if local_model is not None:
        provider, model = local_choice(local_model, provider, model)
    if agent is not None:
        clash = [flag for flag, given in (("--tools", tools), ("--system-prompt", system_prompt), ("--policy", policy),
                                           ("--allow-writes", allow_writes), ("--stop", stop),
                                           ("--temperature", temperature != DEFAULT_TEMPERATURE),
                                           ("--max-output-tokens", max_output_tokens != DEFAULT_MAX_OUTPUT_TOKENS))
                 if given]
        if clash:
            raise UserError(f"{', '.join(clash)}: set by the agent's definition in loopstream.toml, "
                            f"not with --agent {agent}")
        if not workdir.is_dir():
            raise UserError(f"--workdir {workdir} is not a directory")
        flags = session_policy_for(max_tokens=max_tokens, max_seconds=max_seconds, context_budget=context_budget,
                                   policy=None, sandbox=sandbox, network=network, goal_verify=goal_verify,
                                   goal_max_iterations=goal_max_iterations)
        composed = compose_agent(agent, text, workdir)
        log = writer(bus, db, durability)
        config = composed.config
        config.max_steps = max_steps if max_steps != 12 else config.max_steps
        # Budget, sandbox and goal flags apply over the agent's policy: only what they set.
        if changes := flags.model_dump(mode="json", exclude_defaults=True):
            config.policy = config.policy.updated(changes, "command line")
        choice = ModelChoice(provider or composed.agent.spec.provider, model or composed.agent.spec.model,
                             base_url, action_mode, fallback_model or [], rpm, tpm)
        with mcp_tools(composed, workdir):
            report(run_agent(log, text, config, composed.registry, choice, watch(quiet, log, bus),
                             agents=sub_agents(workdir)))
        return
    sampling = sampling_options(temperature, max_output_tokens, stop)
    registry, names = select_tools(tools, allow_writes)
    if not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is not a directory")
    prompt = read_text_file(system_prompt, "--system-prompt") if system_prompt else DEFAULT_SYSTEM_PROMPT
    session_policy = session_policy_for(max_tokens=max_tokens, max_seconds=max_seconds,
                                        context_budget=context_budget, policy=policy,
                                        sandbox=sandbox, network=network, goal_verify=goal_verify,
                                        goal_max_iterations=goal_max_iterations)  # a bad file: before any log opens
    log = writer(bus, db, durability)
    if allow_writes and (excluded := log_inside(log, workdir)):  # never snapshot (nor restore) the log itself
        session_policy = session_policy.updated({"checkpoint_exclude": [*session_policy.checkpoint_exclude,
                                                                        *excluded]})
    choice = ModelChoice(provider, model, base_url, action_mode, fallback_model or [], rpm, tpm)
    check_script_tools(provider, model, names)
    config = SessionConfig(provider="", model="", tools=names, system_prompt=prompt, max_steps=max_steps,
                           workdir=str(workdir.resolve()), policy=session_policy,
                           sampling=sampling)  # provider and model: once it is open
    report(run_agent(log, text, config, registry, choice, watch(quiet, log, bus)))


def check_script_tools(provider: str | None, model: str | None, names: list[str]) -> None:
    """The scripted model's script must find the tools it calls (one line, before a log opens)."""
    if (provider or "").lower() == "scripted" and (missing := missing_tools(model or "adder", names)):
        spec = model or "adder"
        raise UserError(f"the scripted model {spec!r} calls {', '.join(missing)}, which --tools does not include: "
                        f"add {', '.join(missing)} to --tools, or choose a script with --model "
                        f"(adder, reads:FILE, shell:COMMAND, …)")


def compose_agent(name: str, goal: str, workdir: Path) -> Composed:
    """Agent `name` of the project file, ready to start; warnings (skipped skills, broken plugins) printed."""
    try:
        composed = compose(name, goal, workdir, DEFAULT_SYSTEM_PROMPT)
    except ProjectError as exc:
        raise UserError(str(exc)) from None
    for message in composed.warnings:
        output.warning(message)
    return composed


@contextmanager
def mcp_tools(composed: Composed, workdir: Path) -> Iterator[None]:
    """The agent's MCP servers started (their tools added to the run) until the run ends."""
    with _hub(composed.agent.mcp, str(workdir.resolve())) as hub:
        composed.registry.add(*hub.tools)
        composed.config.tools += [t.name for t in hub.tools]
        yield


@contextmanager
def _hub(servers: dict, workdir: str) -> Iterator[McpHub]:
    try:
        hub = McpHub(servers, workdir).__enter__()
    except McpError as exc:
        raise UserError(str(exc)) from None
    try:
        yield hub
    finally:
        hub.close()


def local_choice(key: str, provider: str | None, model: str | None) -> tuple[str, str]:
    """(provider, model) for `--local-model KEY`, or one line saying what conflicts with it."""
    try:
        chosen = find_local_model(key)
    except ValueError as exc:
        raise UserError(f"--local-model: {exc}") from None
    if provider not in (None, "local") or (model is not None and model != chosen.name):
        raise UserError("--local-model picks the provider and the model: leave out --provider and --model "
                        "(and LOOPSTREAM_PROVIDER, LOOPSTREAM_MODEL)")
    return "local", chosen.name


def sampling_options(temperature: float, max_output_tokens: int, stop: list[str] | None) -> Sampling:
    """The run's sampling settings, or one line naming the option that is wrong."""
    try:
        return sampling_from({"temperature": temperature, "max_output_tokens": max_output_tokens, "stop": stop or []})
    except SamplingError as exc:
        raise UserError(f"--{exc.setting.replace('_', '-')}: {exc.reason}") from None


def select_tools(tools: str | None, allow_writes: bool) -> tuple[ToolRegistry, list[str]]:
    """The registry a run may use and the tool names it was asked for (all when None)."""
    base = default_registry(allow_writes=allow_writes)
    registry = with_delegation(base)  # delegate / spawn_agents when asked for (docs/subagents.md)
    names = [t.strip() for t in tools.split(",") if t.strip()] if tools else base.names()
    need_writes(names, allow_writes)
    try:
        return registry.select(names), names
    except KeyError as exc:
        raise UserError(str(exc.args[0])) from None


def need_writes(names: list[str], allow_writes: bool) -> None:
    asked = [n for n in names if n in {t.name for t in SIDE_EFFECT_TOOLS}]
    if asked and not allow_writes:
        raise UserError(f"{', '.join(asked)} change the workspace: pass --allow-writes to enable them")


def session_policy_for(*, max_tokens: int | None, max_seconds: float | None, context_budget: int | None,
                       policy: Path | None, sandbox: str | None = None, network: bool = False,
                       goal_verify: str | None = None, goal_max_iterations: int | None = None) -> SessionPolicy:
    """The session's policy: the --policy file, then the budget and sandbox flags over it."""
    budgets = {k: v for k, v in (("max_tokens", max_tokens), ("max_wall_seconds", max_seconds)) if v}
    compaction = {"context_budget_tokens": context_budget} if context_budget else {}
    if sandbox is not None and sandbox not in get_args(SandboxMode):
        raise UserError(f"--sandbox {sandbox!r}: expected one of {', '.join(get_args(SandboxMode))}")
    box = {**({"mode": sandbox} if sandbox else {}), **({"network": True} if network else {})}
    if goal_verify is not None and not goal_verify.strip():
        raise UserError("--goal-verify: the verify command is empty")
    goal = {**({"verify_command": goal_verify} if goal_verify else {}),
            **({"max_iterations": goal_max_iterations} if goal_max_iterations else {})}
    try:
        from_file = load_policy(policy) if policy is not None else SessionPolicy()
        return from_file.updated({"budgets": budgets, "compaction": compaction, "sandbox": box, "goal": goal}, "command line")
    except PolicyError as exc:
        raise UserError(str(exc)) from None


def log_inside(log: Log, workdir: Path) -> list[str]:
    """gitignore patterns for the SQLite log's files (and its leases) when they live inside `workdir`."""
    path = getattr(log, "path", None)
    if path is None:
        return []
    path, root = Path(path).resolve(), workdir.resolve()
    if root not in path.parents or path.relative_to(root).parts[0] == ".loopstream":  # never snapshotted anyway
        return []
    rel = path.relative_to(root).as_posix()
    return [f"/{rel}", f"/{rel}-wal", f"/{rel}-shm", f"/{rel}-journal", f"/{rel}.leases/"]


def sub_agents(workdir: Path):
    """The children a run's sub-agents start as (docs/subagents.md): agent NAME of the project
    file composed for its task; None when it cannot be (the child settles failed, saying so)."""
    def resolve(name: str, task: str) -> SessionConfig | None:
        try:
            return compose(name, task, workdir, DEFAULT_SYSTEM_PROMPT).config
        except ProjectError:
            return None
    return resolve


def run_agent(log: Log, goal: str, config: SessionConfig, registry: ToolRegistry, choice: ModelChoice,
              watch: Watch, agents=None) -> Outcome:
    """Start a session on `goal` and drive it to its end (or until Ctrl-C)."""
    sid = None
    try:
        with ExitStack() as stack:
            found = installed_plugins()
            chosen = stack.enter_context(open_model(choice.provider, choice.model, choice.base_url,
                                                    choice.action_mode, on_local_start=watch.on_local_model,
                                                    plugins=plugin_providers(found)))
            backups = [stack.enter_context(open_model(choice.provider, m, choice.base_url, choice.action_mode,
                                                      plugins=plugin_providers(found)))
                       for m in choice.fallbacks]
            if backups:
                config.policy = config.policy.updated({"fallback_models": [b.model for b in backups]})
            limits = rate_limits([chosen, *backups], choice.rpm, choice.tpm)
            runtime = build_runtime(log, chosen, registry, on_event=watch.on_event, fallbacks=backups, limits=limits,
                                    agents=agents, extra=plugin_processors(found))
            config.provider, config.model = chosen.name, chosen.model
            sid = runtime.start_session(goal, config)
            if watch.on_start:
                watch.on_start(sid, chosen)
            with _lease(log, sid):
                return _drive(runtime, sid, watch)
    except KeyboardInterrupt:
        return Outcome(sid, None)


def installed_plugins() -> list[plugin_mod.Plugin]:
    """The installed plugins (a broken one is reported by `loopstream plugins`; skipped here)."""
    return plugin_mod.loaded(plugin_mod.discover())


def plugin_providers(found: list[plugin_mod.Plugin]) -> dict:
    return {name: make for p in found for name, make in p.providers.items()}


def plugin_processors(found: list[plugin_mod.Plugin]) -> list:
    return [proc for p in found for proc in p.processors]


def _drive(runtime: Runtime, sid: str, watch: Watch) -> Outcome:
    on_waiting = (lambda call: watch.on_waiting(sid, call)) if watch.on_waiting else None
    state = drive(runtime, sid, on_waiting)
    ended_by = runtime.log.read(sid, state.seq, state.seq)[0].actor if state.terminal else ""
    return Outcome(sid, state, ended_by)


@contextmanager
def _lease(log: Log, sid: str) -> Iterator[None]:
    if not isinstance(log, SQLiteLog):
        yield
        return
    try:
        with lease.hold(log.path, sid):
            yield
    except lease.LeaseHeld as exc:
        raise UserError(str(exc)) from None


# -- resume ------------------------------------------------------------------------
def resume(
    session: SessionArg,
    model: Annotated[Optional[str], typer.Option(show_default=False, help="Model for the remaining steps (default: the session's own).")] = None,
    provider: Annotated[Optional[str], typer.Option(show_default=False, help="anthropic | openai | local | scripted (default: the session's own).")] = None,
    base_url: Annotated[Optional[str], typer.Option(show_default=False, help="OpenAI-compatible server URL (default: env OPENAI_BASE_URL).")] = None,
    action_mode: Annotated[Optional[str], typer.Option(show_default=False, help="native | json_schema | json_text.")] = None,
    allow_writes: Annotated[bool, typer.Option("--allow-writes", help="Needed when the session was started with write_file, edit_file or shell.")] = False,
    quiet: QuietOpt = False,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Continue a session that was interrupted (crash, Ctrl-C, lost connection) from its log.
    A session whose stored events were changed (its hash chain is broken) is not continued."""
    log = writer(bus, db)
    sid = resolve(log, session)
    report(resume_agent(log, sid, ModelChoice(provider, model, base_url, action_mode), allow_writes,
                        watch(quiet, log, bus)))


def resume_agent(log: Log, sid: str, choice: ModelChoice, allow_writes: bool, watch: Watch) -> Outcome:
    """Drive an unfinished session on from where its log stands (or until Ctrl-C)."""
    problem = show_session(log, sid).problem
    if problem:
        raise LogDamaged(f"will not resume session {sid}: it fails verification: {problem}")
    state = load(log, sid)
    if state.terminal and not state.end_hooks_owed:  # ended; its SessionEnd hooks (if owed) still run here
        raise UserError(f"session {sid} already ended ({state.status}); to continue from an earlier point: "
                        f"loopstream fork {sid} --at SEQ")
    need_writes(state.tools, allow_writes)
    if choice.provider is None and choice.model is None:  # the session's own model (a fork may have changed it)
        choice.provider, choice.model = state.provider, state.model
    try:
        found = installed_plugins()
        with _lease(log, sid), open_model(choice.provider, choice.model, choice.base_url, choice.action_mode,
                                          on_local_start=watch.on_local_model,
                                          plugins=plugin_providers(found)) as chosen:
            registry, warnings = registry_for_session(state.agent_json, allow_writes)
            for message in warnings:
                output.warning(message)
            with _hub(recorded_mcp(state.agent_json), state.workdir) as hub:  # the MCP servers it ran with
                registry.add(*hub.tools)
                runtime = build_runtime(log, chosen, registry, on_event=watch.on_event,
                                        agents=sub_agents(Path(state.workdir or ".")),
                                        extra=plugin_processors(found))
                return _drive(runtime, sid, watch)
    except KeyboardInterrupt:
        return Outcome(sid, None)


# -- printing ----------------------------------------------------------------------
COLORS = {"ModelResponded": "cyan", "ToolCompleted": "green", "ToolFailed": "yellow", "ModelFailed": "yellow",
          "SessionFailed": "red", "SessionFinished": "bold green"}


def child_approvals(event: ev.Event, children: set[str]) -> bool:
    """Note the child sessions (docs/subagents.md) as they start, and say how to decide a
    child's approval request (the foreground driver waits on the parent); whether `event` is a child's."""
    if isinstance(event.payload, ev.SessionStarted) and event.payload.parent_session_id:
        children.add(event.session_id)
    if event.session_id not in children:
        return False
    if isinstance(event.payload, ev.ApprovalRequested):
        p = event.payload
        try:
            arguments = json.loads(p.arguments_json or "{}")
        except ValueError:
            arguments = {"_raw": p.arguments_json}
        waiting(event.session_id, WaitingCall(p.call_id, p.name, arguments if isinstance(arguments, dict)
                                              else {"_value": arguments}, p.reason))
    return True


def progress(event: ev.Event, children: set[str] | None = None) -> None:
    """One progress line per event; a child session's marked with its id."""
    indent = f"  [child {event.session_id[:8]}]" if children is not None and child_approvals(event, children) else ""
    if event.type == "GoalVerified":  # goal mode: the iteration's result stands out
        p = event.payload
        output.note(Styled(f"goal iteration {p.iteration}: {'PASSED' if p.passed else 'not yet'}",
                           "bold green" if p.passed else "bold yellow"), f" (verify exit code {p.exit_code})")
    output.note(indent + "  ", Styled(f"{event.seq:>3} {event.type:<16}", COLORS.get(event.type, "dim")), " ",
                summarize(event, 100))


def waiting(sid: str, call: WaitingCall) -> None:
    output.note(Styled("waiting for approval", "bold yellow"), f" of {call.describe()} ({call.reason})")
    output.note(f"  approve: loopstream approve {sid} {call.call_id}")
    output.note(f"  deny:    loopstream deny {sid} {call.call_id} --reason '…'")


def watch(quiet: bool, log: Log, bus: str | None) -> Watch:
    """Progress lines on stderr, unless `quiet` (approval requests are always shown)."""
    children: set[str] = set()  # child sessions seen (docs/subagents.md): their lines are marked
    if quiet:
        return Watch(on_event=lambda e: child_approvals(e, children), on_waiting=waiting)

    def started(sid: str, chosen: Provider) -> None:
        output.dim(f"session {sid} · {chosen.name}:{chosen.model} · log {getattr(log, 'path', bus)}")

    return Watch(on_event=lambda e: progress(e, children), on_waiting=waiting, on_start=started,
                 on_local_model=lambda: output.dim("starting the local model (llama.cpp, Qwen2.5-Coder-0.5B)…"))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def report(outcome: Outcome) -> None:
    """The answer on stdout (exit 0); the reason (exit 1); how to continue after Ctrl-C (exit 130)."""
    sid, state = outcome.session_id, outcome.state
    if state is None:
        where = f"; continue it with: loopstream resume {sid}" if sid else ""
        output.note(Styled("interrupted:", "bold yellow"), f" every step so far is in the log{where}")
        raise typer.Exit(EXIT_INTERRUPTED)
    if state.status == "done":
        output.answer(state.answer or "")
        output.note(Styled("session", "dim"), f" {sid} ", Styled(
            f"· {_count(state.step, 'step')} · {_count(state.tool_calls, 'tool call')} · "
            f"{state.input_tokens}+{state.output_tokens} tokens", "dim"))
        return
    if state.status == "paused":
        output.note(Styled("paused", "bold yellow"), f" session {sid} (by {state.paused_by or 'someone'}); "
                    f"it stays paused across restarts; continue it with: loopstream goal resume {sid}")
        raise typer.Exit(EXIT_PAUSED)
    if state.status == "cancelled":  # by a person, maybe from another terminal while this one ran
        output.error(f"session {sid} was cancelled by {outcome.ended_by or 'someone'}: {state.error or 'no reason given'}")
        raise typer.Exit(1)
    output.error(f"session {sid} {state.status}: {state.error or 'stopped in state ' + state.status}")
    raise typer.Exit(1)

