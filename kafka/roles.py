"""Worker roles (`loopstream worker`): a Worker with the processors of `orchestrator`,
`model`, `tool` or `all`, plus, for the orchestrator on Kafka, the goal intake and the
results publisher (or the transactional relay). The roles: docs/kafka.md#groups-and-roles."""
from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopstream.core import events as ev
from loopstream.core.log import LogError
from loopstream.core.memory import MemoryStore
from loopstream.kafka.bus import open_log
from loopstream.kafka.clients import ContractProducer
from loopstream.kafka.contract import ContractError, parse_kafka_url
from loopstream.kafka.intake import GoalIntake
from loopstream.kafka.ops import WorkerOps
from loopstream.kafka.registry import RegistryContract
from loopstream.kafka.relay import TransactionalResultsRelay
from loopstream.kafka.results import ResultsPublisher
from loopstream.kafka.settings import KafkaSettings
from loopstream.runtime.assembly import ROLES, default_agents, open_model, processors_for, rate_limits
from loopstream.runtime.inline import SessionConfig
from loopstream.runtime.worker import Worker, install_signal_handlers


@dataclass
class WorkerOptions:
    role: str
    bus: str | None = None
    db: Path | None = None
    provider: str | None = None
    model: str | None = None
    fallback_models: tuple[str, ...] = ()  # after `model`, in order, when it keeps failing
    rpm: float | None = None  # client-side limits of the model role, per process
    tpm: float | None = None
    allow_writes: bool = False  # the tool role may run write_file, edit_file and shell
    base_url: str | None = None
    action_mode: str | None = None
    group_prefix: str | None = None
    concurrency: int = 8
    agents_file: Path | None = None
    kafka: KafkaSettings | None = None  # client properties and topic configs (default: the environment's)
    metrics_port: int | None = None  # serve /healthz, /readyz, /metrics (kafka/ops.py) on this port
    metrics_host: str = "127.0.0.1"
    on_event: Callable[[ev.Event], None] | None = None
    on_local_start: Callable[[], None] | None = None
    # The project file's agents and the plugins (agents/serve.py, given by `loopstream worker`):
    compose: Callable[[str, str], SessionConfig | None] | None = None  # the intake's project agents
    registry: Any = None  # a ToolRegistry: the tool role's tools (plugins', load_skill, MCP servers')
    extra: tuple[Any, ...] = ()  # plugin processors, each in the role it acts for
    providers: Mapping[str, Callable[..., Any]] | None = None  # plugin providers by name


@contextmanager
def open_role(opts: WorkerOptions) -> Iterator[tuple[Any, GoalIntake | None]]:
    """The Worker (not yet running) and the goal intake (not yet started) for a role."""

    if opts.role not in ROLES:
        raise ContractError(f"unknown role {opts.role!r}: one of {', '.join(ROLES)}")
    bus = opts.bus or os.environ.get("LOOPSTREAM_BUS") or None
    kbus = parse_kafka_url(bus, opts.kafka) if bus and bus.startswith("kafka://") else None
    with ExitStack() as stack:
        log = open_log(bus, opts.db, kafka=kbus.settings if kbus else None)
        stack.callback(log.close)
        provider, fallbacks, limits = _open_models(stack, opts)
        publisher = intake = None
        if kbus is not None and opts.role in ("orchestrator", "all"):
            producer = ContractProducer(kbus.bootstrap, settings=kbus.settings)
            stack.callback(producer.close)
            transactional = kbus.results == "transactional"
            registry = (RegistryContract(kbus.settings.registry, kbus.goals_topic, kbus.results_topic)
                        if kbus.settings.registry.url else None)
            encode = registry.encode_update if registry is not None else None
            # results=transactional: results go through the relay (kafka/relay.py), the
            # publisher sends progress updates only.
            publisher = ResultsPublisher(log, producer, results=not transactional, encode=encode)
            agents = default_agents(
                provider.name if provider else (opts.provider or os.environ.get("LOOPSTREAM_PROVIDER") or "any"),
                provider.model if provider else (opts.model or os.environ.get("LOOPSTREAM_MODEL") or "default"),
                opts.agents_file,
            )
            agents = _with_fallbacks(agents, [p.model for p in fallbacks] if provider else list(opts.fallback_models))
            intake = GoalIntake(log, kbus, kbus.group("intake", opts.group_prefix), agents, publisher,
                                on_event=opts.on_event, registry=registry, compose=opts.compose)
            if transactional:
                intake.relay = TransactionalResultsRelay(kbus, log, kbus.group("results", opts.group_prefix),
                                                         goals=publisher.goals)
                if encode is not None:
                    intake.relay.encode = encode
        group = kbus.group(opts.role, opts.group_prefix) if kbus else f"{opts.group_prefix or 'loopstream'}.{opts.role}"
        worker = Worker(log, processors_for(opts.role, provider=provider, fallbacks=fallbacks, limits=limits,
                                           publisher=publisher, allow_writes=opts.allow_writes,
                                           memory=MemoryStore.for_log(log), registry=opts.registry,
                                           extra=opts.extra, subagents=log), group,
                        concurrency=opts.concurrency, on_event=opts.on_event)
        yield worker, intake


def _open_models(stack: ExitStack, opts: WorkerOptions) -> tuple[Any, list[Any], Any]:
    """(model, fallbacks, rate limits) of a role: the model role calls them, as `run` does;
    a tool role given a model reviews tool calls with it when a session's guardrails ask."""
    if not (opts.role in ("model", "all") or (opts.role == "tool" and (opts.provider or opts.model))):
        return None, [], None
    primary = stack.enter_context(open_model(opts.provider, opts.model, opts.base_url, opts.action_mode,
                                             on_local_start=opts.on_local_start, plugins=opts.providers))
    if opts.role == "tool":
        return primary, [], None
    fallbacks = [stack.enter_context(open_model(opts.provider, m, opts.base_url, opts.action_mode,
                                                plugins=opts.providers)) for m in opts.fallback_models]
    return primary, fallbacks, rate_limits([primary, *fallbacks], opts.rpm, opts.tpm)


def _with_fallbacks(agents: dict[str, SessionConfig], models: list[str]) -> dict[str, SessionConfig]:
    """Agents whose sessions switch to `models` (in order) when their model keeps failing,
    unless an agent lists its own `fallback_models`."""
    if not models:
        return agents
    return {name: c if c.policy.fallback_models else
            dataclasses.replace(c, policy=c.policy.updated({"fallback_models": models})) for name, c in agents.items()}


def run_role(opts: WorkerOptions, install_signals: bool = True,
             on_ready: Callable[[Any, GoalIntake | None], None] | None = None) -> Any:
    """Run a role until SIGTERM/SIGINT; the worker (for its stats)."""
    early: list[int] = []  # a stop asked for while starting (e.g. loading the local model)
    if install_signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda n, _frame: early.append(n))
    with open_role(opts) as (worker, intake):
        relay = intake.relay if intake is not None else None
        helpers = [h for h in (intake, relay) if h is not None]
        if install_signals:
            install_signal_handlers(worker, *(h.stop for h in helpers))
            if early:  # the real handler stops the worker and its helpers; they close cleanly
                signal.raise_signal(early[0])
        ops = _ops(opts, worker, intake, relay)
        for h in helpers:
            h.start()
        if on_ready is not None:
            on_ready(worker, intake)
        try:  # a dead goal intake (or results relay) stops the process (a supervisor restarts it)
            worker.run(until=(lambda: any(h.error is not None for h in helpers)) if helpers else None)
            if intake is not None and intake.error is not None:
                raise LogError(f"the goal intake stopped: {intake.error}")
            if relay is not None and relay.error is not None:
                raise LogError(f"the results relay stopped: {relay.error}")
        finally:
            for h in helpers:
                h.stop()
            if intake is not None:
                intake.join(10)
            if relay is not None:
                relay.join(relay.timeout + 5)  # it finishes the running transaction
            if ops is not None:
                ops.close()
        return worker


def _ops(opts: WorkerOptions, worker: Any, intake: GoalIntake | None, relay: Any) -> WorkerOps | None:
    """The operations surface of the role, serving, if `metrics_port` is set."""
    if opts.metrics_port is None:
        return None
    log = worker.log
    groups = {worker.group: log.topic} if hasattr(log, "topic") else {}
    if intake is not None:
        groups[intake.group] = intake.kbus.goals_topic
    if relay is not None:
        groups[relay.group] = log.topic
    ops = WorkerOps(worker, opts.role, lag_groups=groups, bootstrap=getattr(log, "bootstrap", None),
                    settings=getattr(log, "settings", None), helpers=[h for h in (intake, relay) if h is not None])
    ops.attach(worker.writer, *([intake.writer] if intake is not None else []))
    ops.serve(opts.metrics_port, opts.metrics_host)
    return ops


