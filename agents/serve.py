"""What a worker (`loopstream worker`) takes from the project file and the plugins, so goals
handed to workers run the project's agents as `run --agent` does: the goal intake composes
a named agent per goal (prompt templated with the goal, skills listed, SessionStart hooks run
and recorded, MCP tools named), and the tool role has the plugins' tools, `load_skill` over
the skills found and the MCP servers' tools, the servers started with the worker and shared
by its sessions. Plugin processors join the role they act for; plugin providers are chosen by
`--provider NAME`."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopstream.agents import plugins as plugin_mod
from loopstream.agents import skills as skill_mod
from loopstream.agents.assemble import compose, full_registry, open_project, skill_folders
from loopstream.agents.mcp import McpHub
from loopstream.agents.project import ProjectError
from loopstream.runtime.writer import SessionConfig
from loopstream.tools.registry import ToolRegistry

Compose = Callable[[str, str], SessionConfig | None]


@dataclass
class WorkerAgents:
    """The project's agents for a worker (see the module doc)."""

    compose: Compose  # (agent name, goal) -> its config; None: not an agent of the project
    registry: ToolRegistry  # built-in + plugin tools, load_skill over every skill found, MCP tools
    processors: list[Any] = field(default_factory=list)  # the plugins'
    providers: dict[str, Callable[..., Any]] = field(default_factory=dict)  # the plugins'
    warnings: list[str] = field(default_factory=list)


@contextmanager
def worker_agents(start: Path, *, allow_writes: bool = False, provider: str = "", model: str = "",
                  default_prompt: str = "", mcp: bool = True,
                  plugins: list[plugin_mod.Plugin] | None = None) -> Iterator[WorkerAgents]:
    """The project (found upward from `start`) for a worker whose model is `provider`/`model`
    (an agent's own provider and model are recorded when it names them). With `mcp`, the MCP
    servers of every project agent are started until the block ends. ProjectError: one line."""
    plugins = plugin_mod.discover() if plugins is None else plugins
    warnings = [f"plugin {p.name} ({p.value}) skipped: {p.error}" for p in plugins if p.error]
    project = open_project(start, plugins)
    registry = full_registry(plugins, allow_writes)
    found, skipped = skill_mod.discover(skill_folders(project, start, plugins))
    warnings += skipped
    if found:
        registry.add(skill_mod.load_skill_tool(list(found.values())))
    servers = {n: s for a in project.agents.values() for n, s in a.mcp.items()} if mcp else {}
    with ExitStack() as stack:
        hub = stack.enter_context(McpHub(servers, str(start.resolve())))
        registry.add(*[t for t in hub.tools if t.name not in registry.tools])

        def composed(name: str, goal: str) -> SessionConfig | None:
            if name not in open_project(start, plugins).agents:  # read again: an edit takes effect
                return None
            agent = compose(name, goal, start, default_prompt, start=start, plugins=plugins)
            config = agent.config
            prefixes = tuple(f"{server}__" for server in agent.agent.mcp)
            config.tools += [t.name for t in hub.tools if t.name.startswith(prefixes)]
            config.provider = agent.agent.spec.provider or provider
            config.model = agent.agent.spec.model or model
            return config

        loaded = plugin_mod.loaded(plugins)
        yield WorkerAgents(composed, registry, [p for x in loaded for p in x.processors],
                           {k: v for x in loaded for k, v in x.providers.items()}, warnings)


__all__ = ["Compose", "ProjectError", "WorkerAgents", "worker_agents"]
