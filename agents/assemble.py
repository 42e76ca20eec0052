"""Everything `loopstream run --agent NAME` needs, from the project file, the skill folders
and the installed plugins: the SessionConfig to record, the tool registry, the model choice."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from loopstream.agents import plugins as plugin_mod
from loopstream.agents import skills as skill_mod
from loopstream.agents.definition import session_config
from loopstream.agents.project import Agent, McpServer, Project, ProjectError, load_project, user_file
from loopstream.agents.start_hooks import StartRefused, run_session_start
from loopstream.core.policy import PolicyError
from loopstream.runtime.assembly import with_delegation
from loopstream.runtime.writer import SessionConfig
from loopstream.tools.builtin import default_registry
from loopstream.tools.registry import ToolRegistry
from loopstream.tools.workspace import TOOLS as SIDE_EFFECT_TOOLS


@dataclass
class Composed:
    """What an agent run starts with."""

    agent: Agent
    config: SessionConfig
    registry: ToolRegistry
    warnings: list[str] = field(default_factory=list)
    plugins: list[plugin_mod.Plugin] = field(default_factory=list)


def skill_folders(project: Project, start: Path, plugins: list[plugin_mod.Plugin]) -> list[Path]:
    """Where skills are looked for, first wins: the project's, the user's, the plugins'."""
    root = project.root or start.resolve()
    return [root / ".loopstream" / "skills", user_file().parent / "skills",
            *[p for plugin in plugin_mod.loaded(plugins) for p in plugin.skills]]


def open_project(start: Path, plugins: list[plugin_mod.Plugin]) -> Project:
    agents = {name: (table, p.name) for p in plugin_mod.loaded(plugins) for name, table in p.agents.items()}
    return load_project(start, plugin_agents=agents)


def full_registry(plugins: list[plugin_mod.Plugin], allow_writes: bool) -> ToolRegistry:
    """The built-in tools and the plugins' (a plugin's tool never replaces a built-in one)."""
    registry = with_delegation(default_registry(allow_writes=allow_writes))  # sub-agents: docs/subagents.md
    for plugin in plugin_mod.loaded(plugins):
        registry.add(*[t for t in plugin.tools if t.name not in registry.tools])
    return registry


def compose(name: str, goal: str, workdir: Path, default_prompt: str, *, start: Path | None = None,
            plugins: list[plugin_mod.Plugin] | None = None) -> Composed:
    """Agent `name` ready to start on `goal`; ProjectError (one line) for anything wrong."""
    start = start or Path.cwd()
    plugins = plugin_mod.discover() if plugins is None else plugins
    warnings = [f"plugin {p.name} ({p.value}) skipped: {p.error}" for p in plugins if p.error]
    project = open_project(start, plugins)
    agent = project.agent(name)
    where = f"{agent.source}: agents.{name}"
    registry = full_registry(plugins, agent.spec.allow_writes)
    found, skipped = skill_mod.discover(skill_folders(project, start, plugins))
    warnings += skipped
    try:
        skills = skill_mod.select(found, agent.spec.skills, f"{where}.skills")
    except skill_mod.SkillError as exc:
        raise ProjectError(str(exc)) from None
    if skills:
        registry.add(skill_mod.load_skill_tool(skills))
    names = agent.spec.tools if agent.spec.tools is not None else default_registry().names()
    writes = [n for n in names if n in {t.name for t in SIDE_EFFECT_TOOLS}]
    if writes and not agent.spec.allow_writes:
        raise ProjectError(f"{where}.tools: {', '.join(writes)} change the workspace: set allow_writes = true")
    unknown = [n for n in names if n not in registry.tools]
    if unknown:
        raise ProjectError(f"{where}.tools: unknown tool {unknown[0]!r} (known: {', '.join(sorted(registry.tools))})")
    names = [*names, *(["load_skill"] if skills and "load_skill" not in names else [])]
    config = session_config(agent, goal, workdir.resolve(), names, skills, default_prompt)
    plugin_hooks = [h for p in plugin_mod.loaded(plugins) for h in p.hooks]
    if plugin_hooks:
        try:
            config.policy = config.policy.updated(
                {"hooks": [*[h.model_dump() for h in config.policy.hooks], *plugin_hooks]}, "plugin hooks")
        except PolicyError as exc:
            raise ProjectError(str(exc)) from None
    try:
        config = run_session_start(config, goal)
    except StartRefused as exc:
        raise ProjectError(str(exc)) from None
    return Composed(agent, config, registry, warnings, plugins)


def recorded_mcp(agent_json: str) -> dict[str, McpServer]:
    """The MCP servers a session's definition recorded (to start them again for `resume`)."""
    try:
        servers = json.loads(agent_json or "{}").get("mcp_servers", {})
        return {name: McpServer.model_validate(cfg) for name, cfg in servers.items()}
    except (ValueError, AttributeError):
        return {}


def registry_for_session(agent_json: str, allow_writes: bool,
                         plugins: list[plugin_mod.Plugin] | None = None) -> tuple[ToolRegistry, list[str]]:
    """The tools to continue a recorded session with (`resume`): the built-in and plugin tools,
    and `load_skill` over the skills its definition recorded, read again from their files (a
    skill changed since is used as it is now, with a warning); the warnings."""
    plugins = plugin_mod.discover() if plugins is None else plugins
    registry = full_registry(plugins, allow_writes)
    try:
        recorded = json.loads(agent_json or "{}").get("skills", [])
    except ValueError:
        recorded = []
    skills, warnings = [], []
    for entry in recorded:
        try:
            skill = skill_mod.read_skill(Path(entry["path"]).parent)
        except (skill_mod.SkillError, OSError, KeyError, TypeError) as exc:
            warnings.append(f"skill {entry.get('name', '?') if isinstance(entry, dict) else '?'} unavailable: {exc}")
            continue
        if skill.sha256 != entry.get("sha256"):
            warnings.append(f"skill {skill.name} changed since the session started ({skill.path})")
        skills.append(skill)
    if skills:
        registry.add(skill_mod.load_skill_tool(skills))
    return registry, warnings
