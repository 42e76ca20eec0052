"""Assemble a runnable agent: provider + tools + processors, for the inline driver (`run`)
and for the worker roles (`loopstream worker`) alike."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loopstream.core.log import Log
from loopstream.core.memory import MemoryStore
from loopstream.core.policy import PolicyError
from loopstream.core.processor import Processor
from loopstream.core.sampling import Sampling, SamplingError, sampling_from
from loopstream.processors.compaction import CompactionProcessor
from loopstream.processors.delegation import Delegation
from loopstream.processors.hooks import EndHooks
from loopstream.processors.model import ModelProcessor
from loopstream.processors.orchestrator import Orchestrator
from loopstream.processors.tools import ToolProcessor
from loopstream.processors.verifier import Verifier
from loopstream.providers.base import Provider
from loopstream.providers.errors import ProviderConfigError
from loopstream.providers.factory import open_provider
from loopstream.providers.ratelimit import RateLimiter
from loopstream.providers.scripted import scripted_from_spec
from loopstream.runtime.children import ChildRunner
from loopstream.runtime.children_bus import ChildCoordinator, ChildWatcher
from loopstream.runtime.inline import EventCallback, Runtime, SessionConfig
from loopstream.tools import delegate
from loopstream.tools import memory as memory_tools
from loopstream.tools.builtin import default_registry
from loopstream.tools.registry import ToolRegistry

ROLES = ("orchestrator", "model", "tool", "all")


class AgentsFileError(ValueError):
    """An agents file that cannot be used; the message names the file and the problem."""


DEFAULT_SYSTEM_PROMPT = (
    "You are a careful assistant that completes the user's goal step by step. "
    "Use a tool whenever it can compute or look up something for you; do not guess results. "
    "When you have the answer, reply with it plainly and concisely."
)


def build_runtime(
    log: Log,
    provider: Provider,
    registry: ToolRegistry | None = None,
    on_event: EventCallback | None = None,
    fallbacks: Sequence[Provider] = (),
    summarize_with_model: bool = True,
    limits: Mapping[str, RateLimiter] | None = None,
    agents: Mapping[str, SessionConfig] | None = None,
    extra: Sequence[Any] = (),
) -> Runtime:
    """The in-process agent: a Runtime with the processors of the role `all`, and sub-agents:
    the delegation processor and a child runner (`agents`: the named definitions a child may
    run as). The worker roles have neither yet: there a delegation tool's call fails, saying so.
    `extra`: a plugin's processors and observers."""
    return Runtime(log, processors_for("all", provider=provider, registry=registry, fallbacks=fallbacks,
                                       limits=limits, summarize_with_model=summarize_with_model,
                                       memory=MemoryStore.for_log(log), runner=ChildRunner(agents), extra=extra),
                   on_event=on_event)


BUILT_IN_PROVIDERS = frozenset({"anthropic", "openai", "local", "scripted"})


@contextmanager
def open_model(provider: str | None, model: str | None, base_url: str | None = None,
               action_mode: str | None = None,
               on_local_start: Callable[[], None] | None = None,
               plugins: Mapping[str, Callable[..., Any]] | None = None) -> Iterator[Provider]:
    """The provider for a run: `scripted` (tests, benchmarks), one a plugin adds (`plugins`:
    name -> callable(model) returning a Provider; never replacing a built-in name), or a real
    one from the factory.

    `on_local_start` is called once the configuration is known to be valid and the
    local model server is about to start (so a CLI can say why it is waiting)."""
    name = (provider or "").lower()
    if plugins and name not in BUILT_IN_PROVIDERS and name in plugins:
        try:
            made = plugins[name](model)
        except Exception as exc:  # a plugin's bug is a one-line configuration error
            raise ProviderConfigError(f"provider {name!r} (a plugin's) failed to start: "
                                      f"{type(exc).__name__}: {exc}") from None
        if not callable(getattr(made, "complete", None)):
            raise ProviderConfigError(f"provider {name!r} (a plugin's) gave {type(made).__name__}, not a provider "
                                      f"with complete(messages, tools, sampling)")
        yield made
        return
    if name == "scripted":
        try:
            scripted = scripted_from_spec(model or "adder")
        except ValueError as exc:
            raise ProviderConfigError(str(exc)) from None
        yield scripted
        return
    with open_provider(model=model, provider=provider, base_url=base_url, action_mode=action_mode,
                       on_local_start=on_local_start) as built:
        yield built


def default_agents(provider: str, model: str, agents_file: Path | None = None) -> dict[str, SessionConfig]:
    """The agent configurations goals may name: `default` (the worker's provider/model, the
    default read-only tools) plus those of a JSON file {name: {SessionConfig fields}}; an
    agent's `"policy"` is a SessionPolicy as nested objects (docs/policy.md)."""
    base = SessionConfig(provider=provider, model=model, tools=default_registry().names(),
                         system_prompt=DEFAULT_SYSTEM_PROMPT, agent="default", workdir=".")
    agents = {"default": base}
    if agents_file is not None:
        try:
            spec = json.loads(Path(agents_file).read_text())
        except (OSError, ValueError) as exc:
            raise AgentsFileError(f"cannot read agents file {agents_file}: {exc}") from None
        fields = {f.name for f in dataclasses.fields(SessionConfig)}
        for name, over in spec.items():
            unknown = set(over) - fields
            if unknown:
                raise AgentsFileError(f"agent {name!r}: unknown fields {sorted(unknown)}")
            if "sampling" in over:  # {"temperature": 0.2, ...}: the rest keep the safe defaults
                over = {**over, "sampling": _sampling(over["sampling"], f"{agents_file}: agent {name!r}: sampling")}
            try:
                agents[name] = dataclasses.replace(base, agent=name, **over)
            except PolicyError as exc:
                raise AgentsFileError(f"agents file {agents_file}: agent {name!r}: {exc}") from None
    return agents


def _sampling(values: Any, where: str) -> Sampling:
    if not isinstance(values, dict):
        raise AgentsFileError(f"{where}: an object of settings, e.g. {{\"temperature\": 0}}")
    try:
        return sampling_from(values, where=where)
    except SamplingError as exc:
        raise AgentsFileError(str(exc)) from None


def processors_for(
    role: str = "all",
    *,
    provider: Provider | None = None,
    registry: ToolRegistry | None = None,
    fallbacks: Sequence[Provider] = (),
    limits: Mapping[str, RateLimiter] | None = None,
    summarize_with_model: bool = True,
    publisher: Processor | None = None,
    allow_writes: bool = False,
    memory: MemoryStore | None = None,
    subagents: Log | None = None,
    runner: Processor | None = None,
    extra: Sequence[Any] = (),
) -> list[Processor]:
    """The processors of one role, for `build_runtime` (role `all`) and the worker roles
    (kafka/roles.py) alike. `provider` is the model role's model (`fallbacks` after it, in
    order; `limits`: a rate limiter per provider name) and the tool role's reviewer of tool
    calls; `registry` defaults to the built-in tools (`allow_writes`: with the side-effect
    ones), the memory tools, which a session has when its `[memory]` is on (`memory`: the log's
    store, `MemoryStore.for_log`), and the delegation tools; `publisher` joins the orchestrator.
    Sub-agents (docs/subagents.md): `runner`, the in-process child runner (`build_runtime`), or
    `subagents`, the log a subscription driver's children run on (runtime/children_bus.py: a
    coordinator and a watcher), joins the orchestrator, and the delegation processor the tools;
    with neither a delegation tool's call fails, saying so. `extra` (a plugin's): each
    joins the role it acts for, after the built-in ones (an observer, with no `acts_for`, the
    orchestrator's)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    registry = with_delegation(registry or default_registry(allow_writes=allow_writes))
    missing = [t for t in memory_tools.TOOLS if t.name not in registry.tools]
    if missing:  # with_delegation made a copy: the caller's registry is left as it was
        registry = registry.add(*missing)
    procs: list[Processor] = []
    if role in ("orchestrator", "all"):
        procs.append(Orchestrator())
        if runner is not None:
            procs.append(runner)
        elif subagents is not None:
            coordinator = ChildCoordinator(subagents)
            procs += [coordinator, ChildWatcher(coordinator)]
    if role in ("model", "all"):
        procs += [ModelProcessor(provider, registry.specs(), fallbacks, limits),
                  CompactionProcessor(provider if summarize_with_model else None)]
    if role in ("tool", "all"):
        procs += [Delegation()] if subagents is not None or runner is not None else []
        procs += [ToolProcessor(registry, reviewer=provider, memory=memory), Verifier(), EndHooks()]
    if publisher is not None and role in ("orchestrator", "all"):
        procs.append(publisher)
    procs += [p for p in extra if role == "all" or ROLE_OF.get(getattr(p, "acts_for", None) or "", "orchestrator")
              == role]
    return procs


# The role whose worker does an actor's work (core/fsm.py STATES owed_by).
ROLE_OF = {"orchestrator": "orchestrator", "model": "model", "compaction": "model", "tools": "tool",
           "verifier": "tool", "hooks": "tool", "children": "orchestrator"}


def with_delegation(registry: ToolRegistry) -> ToolRegistry:
    """`registry` plus the delegation tools (a copy): the model sees their specs when a
    session has them (docs/subagents.md)."""
    return ToolRegistry({**{t.name: t for t in delegate.TOOLS}, **registry.tools})


def rate_limits(providers: Sequence[Provider], rpm: float | None, tpm: float | None) -> dict[str, RateLimiter] | None:
    """Client-side limits (`--rpm`, `--tpm`) for `processors_for`: one limiter per provider name."""
    return {p.name: RateLimiter(rpm, tpm) for p in providers} if rpm or tpm else None
