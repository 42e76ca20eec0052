"""`loopstream worker` and `submit`: processors as independent workers, and goals handed to them."""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from loopstream.agents.mcp import McpError
from loopstream.agents.project import ProjectError
from loopstream.agents.serve import WorkerAgents, worker_agents
from loopstream.cli import output
from loopstream.cli.common import BusOpt, DbOpt, UserError, read_goal, writer
from loopstream.cli.output import Styled
from loopstream.core import events as ev
from loopstream.core.describe import summarize
from loopstream.kafka import clients, restore, roles
from loopstream.kafka import settings as ksettings
from loopstream.kafka import submit as submit_mod
from loopstream.kafka.bus import default_db, sqlite_path
from loopstream.kafka.contract import ContractError, Goal, parse_kafka_url
from loopstream.kafka.ops import OpsError
from loopstream.runtime import lease
from loopstream.runtime.assembly import DEFAULT_SYSTEM_PROMPT, AgentsFileError, default_agents


def worker(
    role: Annotated[str, typer.Option(help="orchestrator | model | tool | all (one consumer group each).")] = "all",
    bus: BusOpt = None,
    db: DbOpt = None,
    model: Annotated[Optional[str], typer.Option(envvar="LOOPSTREAM_MODEL", show_default=False, help="Model for the model role (as for `run`); recorded in sessions the orchestrator starts; for the tool role, the reviewer of tool calls when guardrails ask for review.")] = None,
    provider: Annotated[Optional[str], typer.Option(envvar="LOOPSTREAM_PROVIDER", show_default=False, help="anthropic | openai | local | scripted (as for `run`).")] = None,
    base_url: Annotated[Optional[str], typer.Option(show_default=False, help="OpenAI-compatible server URL (default: env OPENAI_BASE_URL).")] = None,
    action_mode: Annotated[Optional[str], typer.Option(show_default=False, help="native | json_schema | json_text.")] = None,
    fallback_model: Annotated[Optional[list[str]], typer.Option(show_default=False, help="As for `run` (repeatable, in order); give the orchestrator the same ones: it records them in the sessions it starts.")] = None,
    rpm: Annotated[Optional[float], typer.Option(min=0.1, show_default=False, help="Client-side limit of this process: model requests per minute (default: none).")] = None,
    tpm: Annotated[Optional[float], typer.Option(min=1, show_default=False, help="Client-side limit of this process: model tokens per minute (default: none).")] = None,
    group_prefix: Annotated[Optional[str], typer.Option(show_default=False, help="Consumer groups are PREFIX.<role> (default: the bus's topic prefix, `loopstream`).")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Handlers running at once (threads).")] = 8,
    agents: Annotated[Optional[Path], typer.Option(show_default=False, help="JSON file {name: {SessionConfig fields}}: agent configs goals may name.")] = None,
    allow_writes: Annotated[bool, typer.Option("--allow-writes", help="Let the tool role run write_file, edit_file and shell (checkpointed before each).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not print each appended event.")] = False,
    kafka_config: KafkaConfigOpt = None,
    metrics_port: Annotated[Optional[int], typer.Option(min=0, max=65535, show_default=False, help="Serve /healthz, /readyz and Prometheus /metrics on this port (docs/kafka.md#operations).")] = None,
    metrics_host: Annotated[str, typer.Option(help="Address the metrics port binds (0.0.0.0 in a container).")] = "127.0.0.1",
    schema_registry: SchemaRegistryOpt = None,
    instance_id: Annotated[Optional[str], typer.Option(envvar="LOOPSTREAM_INSTANCE_ID", show_default=False, help="Kafka static membership: this worker's group.instance.id, stable across its restarts and unique per role (e.g. model-1); a restart within session.timeout.ms keeps its partitions.")] = None,
) -> None:
    """Run processors as an independent worker over the log until SIGTERM/SIGINT (Kafka: see
    docs/architecture.md#kafka). The orchestrator role also takes goals and publishes results."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=f"%(asctime)s {role} %(levelname)s %(message)s")
    logging.getLogger("loopstream").setLevel(logging.WARNING if quiet else logging.INFO)

    def show_event(e: ev.Event) -> None:
        output.note("  ", Styled(e.session_id[:8], "dim"), f" {e.seq:>3} {e.type:<16} {summarize(e, 90)}")

    def ready(w, intake) -> None:
        output.dim(f"worker {w.group}: {', '.join(p.name for p in w.processors)}"
                   f"{' + goal intake ' + intake.group if intake else ''}"
                   f"{f' + http://{metrics_host}:{metrics_port}/metrics' if metrics_port is not None else ''}")

    opts = roles.WorkerOptions(role=role, bus=bus, db=db, provider=provider, model=model, base_url=base_url,
                               action_mode=action_mode, fallback_models=tuple(fallback_model or ()), rpm=rpm, tpm=tpm,
                               group_prefix=group_prefix, concurrency=concurrency,
                               agents_file=agents, on_event=None if quiet else show_event,
                               allow_writes=allow_writes, kafka=kafka_settings(bus, kafka_config, instance_id, schema_registry),
                               metrics_port=metrics_port, metrics_host=metrics_host)
    try:
        with serving(sqlite_path(bus, db)), project_agents(opts) as found:
            for message in found.warnings:
                output.warning(message)
            w = roles.run_role(opts, on_ready=ready)
    except (ContractError, AgentsFileError, OpsError, ProjectError, McpError) as exc:
        raise UserError(str(exc)) from None
    output.dim(f"worker {w.group} stopped: {w.stats.snapshot()}")


@contextmanager
def project_agents(opts: roles.WorkerOptions) -> Iterator[WorkerAgents]:
    """The project file's agents, skills and MCP servers and the plugins, given to the role as
    `run --agent` uses them (agents/serve.py): the intake composes agents, the tool role has
    their tools; MCP servers are started by the roles that name or call their tools."""
    needs_mcp = opts.role in ("orchestrator", "tool", "all")
    with worker_agents(Path.cwd(), allow_writes=opts.allow_writes, provider=opts.provider or "",
                       model=opts.model or "", default_prompt=DEFAULT_SYSTEM_PROMPT, mcp=needs_mcp) as found:
        opts.compose = found.compose if opts.role in ("orchestrator", "all") else None
        opts.registry = found.registry if opts.role in ("tool", "all") else None
        opts.extra, opts.providers = tuple(found.processors), found.providers
        yield found


KafkaConfigOpt = Annotated[Optional[Path], typer.Option(
    "--kafka-config", envvar=ksettings.CONFIG_ENV, show_default=False,
    help="TOML file with [kafka.client|producer|consumer|admin] librdkafka properties and [kafka.topics] "
         "(docs/kafka.md#settings); LOOPSTREAM_KAFKA_<PROPERTY> variables apply over it.")]


SchemaRegistryOpt = Annotated[Optional[str], typer.Option(
    "--schema-registry", envvar="LOOPSTREAM_SCHEMA_REGISTRY", show_default=False,
    help="Schema Registry URL for the goal contract (over [kafka.registry] url): goals read by their writer's "
         "schema, results framed (docs/kafka.md#schema-registry).")]


def kafka_settings(bus: str | None, path: Path | None, instance_id: str | None = None,
                   schema_registry: str | None = None) -> ksettings.KafkaSettings | None:
    """The Kafka settings of a command on a kafka:// bus, checked now (a one-line UserError)."""
    bus = bus or os.environ.get("LOOPSTREAM_BUS") or ""
    if not bus.startswith("kafka://"):
        return None
    try:
        found = ksettings.load(path)
        if instance_id:
            found = found.with_consumer(**{"group.instance.id": instance_id})
        if schema_registry:
            found = found.with_registry(schema_registry)
        clients.check(found)
    except ksettings.KafkaConfigError as exc:
        raise UserError(str(exc)) from None
    return found


@contextmanager
def serving(log_path: Path | None) -> Iterator[None]:
    """While a worker serves a SQLite log, its unfinished sessions are not `interrupted`."""
    if log_path is None:
        yield
        return
    with lease.hold_worker(log_path):
        yield


@dataclass
class Submitted:
    session_id: str
    waited: bool
    status: str = ""
    answer: str | None = None
    error: str | None = None


def submit_anywhere(bus: str | None, db: Path | None, record: Goal, *, wait: bool, timeout: float,
                    provider: str | None, model: str | None,
                    on_progress: Callable[[object], None] | None = None,
                    kafka: ksettings.KafkaSettings | None = None) -> Submitted:
    """Hand `record` to the workers: a Goal record (Kafka) or a new session in the SQLite log."""
    try:
        if bus and bus.startswith("kafka://"):
            done = submit_mod.submit_goal(bus, record, wait=wait, timeout=timeout, on_progress=on_progress,
                                          settings=kafka)
            result = done.result
            if result is None:
                return Submitted(done.session_id, wait)
            return Submitted(done.session_id, wait, result.status, result.answer, result.error)
        log = writer(bus, db)
        with worker_agents(Path.cwd(), provider=provider or "any", model=model or "default",
                           default_prompt=DEFAULT_SYSTEM_PROMPT) as found:  # MCP servers: to name their tools
            config = found.compose(record.agent, record.goal)
        config = config or default_agents(provider or "any", model or "default").get(record.agent)
        if config is None:
            raise UserError(f"unknown agent {record.agent!r} (a SQLite submit knows `default` and the "
                            f"project file's agents)")
        sid = submit_mod.start_local(log, record, config)
        if not wait:
            return Submitted(sid, False)
        state = submit_mod.wait_local(log, sid, timeout)
        return Submitted(sid, True, state.status, state.answer, state.error)
    except (ContractError, AgentsFileError, ProjectError, McpError) as exc:
        raise UserError(str(exc)) from None


def submit(
    goal: Annotated[Optional[str], typer.Argument(help="What the agent should do.", show_default=False)] = None,
    goal_file: Annotated[Optional[Path], typer.Option(help="Read the goal from this UTF-8 file (- reads stdin).", show_default=False)] = None,
    bus: BusOpt = None,
    db: DbOpt = None,
    agent: Annotated[str, typer.Option(help="Agent configuration the workers know.")] = "default",
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and print the answer.")] = False,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds --wait waits.")] = 300.0,
    idempotency_key: Annotated[Optional[str], typer.Option(show_default=False, help="The same key never starts a second session (default: random).")] = None,
    correlation_id: Annotated[Optional[str], typer.Option(show_default=False, help="Correlation id for the session's events and updates (default: the key).")] = None,
    reply_topic: Annotated[Optional[str], typer.Option(show_default=False, help="Topic for the updates (default: <prefix>.results).")] = None,
    progress: Annotated[bool, typer.Option("--progress", help="Ask for per-step progress updates (printed with --wait).")] = False,
    model: Annotated[Optional[str], typer.Option(show_default=False, help="SQLite bus only: model recorded in the session.")] = None,
    provider: Annotated[Optional[str], typer.Option(show_default=False, help="SQLite bus only: provider recorded in the session.")] = None,
    kafka_config: KafkaConfigOpt = None,
) -> None:
    """Hand GOAL to the workers: a Goal record on the goals topic (Kafka), or a new session in
    the log (SQLite). Prints the session id, or with --wait the answer."""
    record = Goal(goal=read_goal(goal, goal_file), agent=agent, idempotency_key=idempotency_key,
                  correlation_id=correlation_id, reply_topic=reply_topic, progress=progress)

    def on_progress(u) -> None:
        output.note("  ", Styled(f"{u.seq:>3} {u.event_type:<16}", "dim"), f" {u.detail or ''}")

    done = submit_anywhere(bus, db, record, wait=wait, timeout=timeout, provider=provider, model=model,
                           on_progress=on_progress, kafka=kafka_settings(bus, kafka_config))
    if not done.waited:
        output.answer(done.session_id)
        return
    if done.status == "done":
        output.answer(done.answer or "")
        output.note(Styled("session", "dim"), f" {done.session_id}")
        return
    output.error(f"session {done.session_id} {done.status}: {done.error or ''}")
    raise typer.Exit(1)


kafka_app = typer.Typer(help="Operate a Kafka deployment (docs/kafka.md#broker-state-loss).", no_args_is_help=True)


@kafka_app.command("restore")
def kafka_restore(
    bus: BusOpt = None,
    db: DbOpt = None,
    kafka_config: KafkaConfigOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Publish again even if the topic looks intact.")] = False,
) -> None:
    """After the broker lost its state: publish the accepted events of this machine's
    projection (--db, default .loopstream/kafka-projection[.<prefix>].db) to the events topic
    again; waiting workers then rebuild their projections and take work again."""
    url = bus or os.environ.get("LOOPSTREAM_BUS") or ""
    if not url.startswith("kafka://"):
        raise UserError("kafka restore needs --bus kafka://HOST:PORT")
    try:
        kbus = parse_kafka_url(url, kafka_settings(url, kafka_config))
    except ContractError as exc:
        raise UserError(str(exc)) from None
    path = db or default_db().with_name(kbus.projection_name)
    try:
        done = restore.restore(kbus, path, force=force)
    except restore.RestoreRefused as exc:
        raise UserError(str(exc)) from None
    output.answer(f"restored {done.sessions} sessions ({done.events} events) to {kbus.events_topic} "
                  f"({done.partitions} partitions); the projection before it is kept in {done.backup}")
