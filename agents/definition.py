"""An agent of the project file turned into what a session starts with: the SessionConfig
(prompt templated, skills listed, hooks in the policy) and the JSON definition recorded in
SessionStarted (v3 `agent_json`), so replay and fork know exactly what ran."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from loopstream.agents.project import Agent
from loopstream.agents.skills import Skill, skills_prompt
from loopstream.runtime.writer import SessionConfig

PLACEHOLDER = re.compile(r"\{(goal|date|workdir)\}")


def render(template: str, goal: str, workdir: str, date: str | None = None) -> str:
    """`{goal}`, `{date}` (UTC, YYYY-MM-DD) and `{workdir}` filled in; every other brace stays as written."""
    values = {"goal": goal, "workdir": workdir, "date": date or dt.datetime.now(dt.UTC).date().isoformat()}
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


@dataclass
class Started:
    """What `run --agent` starts: the config and the model choice."""

    config: SessionConfig
    provider: str | None
    model: str | None


def session_config(agent: Agent, goal: str, workdir: Path, tools: list[str], skills: list[Skill],
                   default_prompt: str, mcp_tools: list[str] = (), date: str | None = None) -> SessionConfig:
    """The SessionConfig of `agent` on `goal` (provider/model are filled in once opened)."""
    prompt = render(agent.prompt if agent.prompt is not None else default_prompt, goal, str(workdir), date)
    if skills:
        prompt = f"{prompt}\n\n{skills_prompt(skills)}"
    return SessionConfig(provider="", model="", tools=[*tools, *mcp_tools], system_prompt=prompt, agent=agent.name,
                         max_steps=agent.spec.max_steps, workdir=str(workdir), policy=agent.policy,
                         sampling=agent.sampling, definition=definition_json(agent, skills))


def definition_json(agent: Agent, skills: list[Skill]) -> str:
    """The definition recorded in SessionStarted: the spec as written, where it came from, the
    prompt file's digest, each skill's name, folder and digest, each MCP server's settings."""
    spec = agent.spec.model_dump(mode="json", exclude_defaults=True)
    record = {"name": agent.name, "source": str(agent.source), "spec": spec,
              "skills": [{"name": s.name, "path": str(s.path), "sha256": s.sha256} for s in skills],
              "mcp_servers": {n: s.model_dump(mode="json", exclude_defaults=True) for n, s in agent.mcp.items()}}
    if agent.spec.prompt_file is not None and agent.prompt is not None:
        record["prompt_sha256"] = hashlib.sha256(agent.prompt.encode()).hexdigest()
    return json.dumps(record, sort_keys=True)
