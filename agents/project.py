"""The project file: `loopstream.toml` found upward from the working directory, merged over
the user's own (platformdirs' config dir), holding named agents and MCP servers.

Strict: every table forbids unknown keys, and a problem is one `ProjectError` line naming the
file, the dotted key and the reason. The project file wins over the user file: an agent or an
MCP server defined in both is the project's, whole (never a mix of the two).
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loopstream.core.policy import PolicyError, SessionPolicy, parse_policy
from loopstream.core.sampling import Sampling, SamplingError, sampling_from
from loopstream.core.tomlfile import read_toml

FILE_NAME = "loopstream.toml"
MAX_FILE_BYTES = 1 << 20
MAX_PROMPT_BYTES = 200_000


class ProjectError(ValueError):
    """A project file that cannot be used; the message (one line) names the file, key and reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


class McpServer(_Strict):
    """An MCP server: a command started over stdio, or a streamable-HTTP URL (loopback only)."""

    command: list[str] = []
    """argv of the server process (stdio transport)."""
    url: str = ""
    """A streamable-HTTP endpoint, e.g. http://127.0.0.1:8000/mcp."""
    env: dict[str, str] = {}
    """Extra environment variables for a stdio server."""
    timeout_s: float = Field(30.0, gt=0)
    """Seconds one tool call may take."""

    @model_validator(mode="after")
    def _one_transport(self) -> McpServer:
        if bool(self.command) == bool(self.url):
            raise ValueError("an MCP server needs exactly one of `command` (stdio) or `url` (streamable HTTP)")
        return self


class AgentSpec(_Strict):
    """One named agent of a project file."""

    description: str = ""
    """One line shown by `loopstream agents`."""
    provider: str | None = None
    """anthropic | openai | local | scripted (default: from the environment, as `run`)."""
    model: str | None = None
    system_prompt: str | None = None
    """The system prompt, inline; {goal}, {date} and {workdir} are filled in at start."""
    prompt_file: str | None = None
    """A file holding the system prompt (relative to the project file; inside its folder)."""
    tools: list[str] | None = None
    """Tool names (default: the built-in read-only tools)."""
    skills: list[str] = []
    """Skill names the agent may load (`*`: every skill found)."""
    max_steps: int = Field(12, ge=1)
    sampling: dict[str, Any] = {}
    """Sampling settings (core/sampling.py): temperature, max_output_tokens, stop, top_p, seed."""
    policy: dict[str, Any] = {}
    """A session policy (docs/policy.md): budgets, retries, guardrails, permissions, …"""
    hooks: list[dict[str, Any]] = []
    """Hooks (core/policy.py `Hook`); they join the policy's."""
    mcp_servers: list[str] = []
    """Names of `[mcp_servers.NAME]` whose tools the agent gets (as `NAME.tool`)."""
    sub_agents: list[str] = []
    """Agents of this file the agent may delegate to (recorded; checked to exist)."""
    allow_writes: bool = False
    """Also give it the side-effect tools (write_file, edit_file, shell)."""

    @model_validator(mode="after")
    def _one_prompt(self) -> AgentSpec:
        if self.system_prompt is not None and self.prompt_file is not None:
            raise ValueError("give `system_prompt` or `prompt_file`, not both")
        return self


class ProjectFile(_Strict):
    agents: dict[str, AgentSpec] = {}
    mcp_servers: dict[str, McpServer] = {}


@dataclass
class Agent:
    """An agent as resolved from its file: the spec, where it came from, its prompt text
    (untemplated), its policy (hooks included) and sampling, all checked."""

    name: str
    spec: AgentSpec
    source: Path
    prompt: str | None
    policy: SessionPolicy
    sampling: Sampling
    mcp: dict[str, McpServer] = field(default_factory=dict)


@dataclass
class Project:
    """The agents and MCP servers of the project file and the user file, merged."""

    agents: dict[str, Agent] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)  # the files read, user first
    root: Path | None = None  # the folder of the project file (None: no project file)

    def agent(self, name: str) -> Agent:
        if name not in self.agents:
            known = ", ".join(sorted(self.agents)) or "none defined"
            where = ", ".join(map(str, self.files)) or f"no {FILE_NAME} found"
            raise ProjectError(f"unknown agent {name!r} ({where}); known: {known}")
        return self.agents[name]


def user_file() -> Path:
    """The user-level project file (LOOPSTREAM_CONFIG_DIR overrides the platform's config dir)."""
    base = os.environ.get("LOOPSTREAM_CONFIG_DIR") or platformdirs.user_config_dir("loopstream")
    return Path(base) / FILE_NAME


def find_project_file(start: Path) -> Path | None:
    """`loopstream.toml` in `start` or the nearest folder above it."""
    here = start.resolve()
    for folder in (here, *here.parents):
        candidate = folder / FILE_NAME
        if candidate.is_file():
            return candidate
    return None


def load_project(start: Path | None = None, user: Path | None = None,
                 plugin_agents: dict[str, tuple[dict[str, Any], str]] | None = None) -> Project:
    """Plugins' agents ({name: (table, plugin name)}), then the user file, then the project file
    found upward from `start` over them."""
    project = Project()
    for name, (table, plugin) in (plugin_agents or {}).items():
        where = Path(f"plugin {plugin}")
        try:
            spec = AgentSpec.model_validate(table)
        except ValidationError as exc:
            raise one_line(exc, f"{where}: agents.{name}") from None
        project.agents[name] = resolve_agent(name, spec, where, {})
    user = user if user is not None else user_file()
    found = find_project_file(start or Path.cwd())
    for path in (user, found):
        if path is None or not path.exists() or (found is not None and path != found and _same(path, found)):
            continue
        parsed = parse_file(path)
        for name, spec in parsed.agents.items():
            project.agents[name] = resolve_agent(name, spec, path, parsed.mcp_servers)
        project.files.append(path)
    if found is not None:
        project.root = found.parent.resolve()
    for agent in project.agents.values():
        missing = [s for s in agent.spec.sub_agents if s not in project.agents]
        if missing:
            raise ProjectError(f"{agent.source}: agents.{agent.name}.sub_agents: unknown agent(s) "
                               f"{', '.join(map(repr, missing))}")
    return project


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def parse_file(path: Path) -> ProjectFile:
    """A project file read and validated, or ProjectError naming the file, key and reason."""
    raw = read_toml(path, str(path), MAX_FILE_BYTES, ProjectError)
    try:
        return ProjectFile.model_validate(raw)
    except ValidationError as exc:
        raise one_line(exc, str(path)) from None


def resolve_agent(name: str, spec: AgentSpec, source: Path, servers: dict[str, McpServer]) -> Agent:
    """Check what the spec points at (prompt file, MCP servers, policy, hooks, sampling)."""
    where = f"{source}: agents.{name}"
    prompt = spec.system_prompt
    if spec.prompt_file is not None:
        prompt = read_prompt_file(source.parent, spec.prompt_file, f"{where}.prompt_file")
    unknown = [s for s in spec.mcp_servers if s not in servers]
    if unknown:
        raise ProjectError(f"{where}.mcp_servers: no [mcp_servers.{unknown[0]}] in {source}"
                           f" (defined: {', '.join(sorted(servers)) or 'none'})")
    try:
        policy = parse_policy(spec.policy, f"{where}.policy")
        if spec.hooks:
            policy = policy.updated({"hooks": [*[h.model_dump() for h in policy.hooks], *spec.hooks]},
                                    f"{where}.policy")
    except PolicyError as exc:
        raise ProjectError(str(exc).replace(f"{where}.policy: hooks", f"{where}.hooks")) from None
    try:
        sampling = sampling_from(spec.sampling, where=f"{where}.sampling")
    except SamplingError as exc:
        raise ProjectError(str(exc)) from None
    return Agent(name, spec, source, prompt, policy, sampling, {s: servers[s] for s in spec.mcp_servers})


def read_prompt_file(root: Path, relative: str, where: str) -> str:
    """A prompt file inside `root` (a symlink or `..` out of it is refused), as UTF-8 text."""
    path = root / relative
    try:
        real, base = path.resolve(strict=True), root.resolve()
    except (OSError, RuntimeError):
        raise ProjectError(f"{where}: no such file {path}") from None
    if base != real and base not in real.parents:
        raise ProjectError(f"{where}: {relative} resolves to {real}, outside the project folder {base}")
    if not real.is_file():
        raise ProjectError(f"{where}: {path} is not a regular file")
    data = real.read_bytes()
    if len(data) > MAX_PROMPT_BYTES:
        raise ProjectError(f"{where}: {path} is larger than {MAX_PROMPT_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProjectError(f"{where}: {path} is not UTF-8 text (byte {exc.start})") from None


# -- one-line validation errors ---------------------------------------------------------
_EXPECTED = {"dict_type": "a table", "model_type": "a table", "list_type": "an array", "string_type": "a string",
             "int_type": "an integer", "float_type": "a number", "bool_type": "true or false"}


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = ProjectFile
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        if model is ProjectFile and part in ("agents", "mcp_servers"):
            model = ("agent_table" if part == "agents" else "server_table")
            continue
        if model == "agent_table":
            model = AgentSpec
            continue
        if model == "server_table":
            model = McpServer
            continue
        model = None
    return model if isinstance(model, type) else None


def one_line(exc: ValidationError, where: str) -> ProjectError:
    """A pydantic error as one line: `FILE: dotted.key: reason (and N more problems)`."""
    errors = exc.errors()
    first = errors[0]
    loc = tuple(first["loc"])
    dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"
    kind, got = first["type"], repr(first.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        known = list(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        reason = "unknown key" + (f"; did you mean {close[0]!r}?" if close else
                                  f" (known: {', '.join(known)})" if known else "")
    elif kind in _EXPECTED:
        reason = f"expected {_EXPECTED[kind]}, got {got}"
    elif kind == "missing":
        reason = "required key missing"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        reason = f"{msg[:1].lower()}{msg[1:]}" + ("" if kind == "value_error" else f", got {got}")
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return ProjectError(" ".join(f"{where}: {dotted}: {reason}{more}".split()))


