"""The tools that start sub-agents (docs/subagents.md): `delegate` (one child session) and
`spawn_agents` (several, in parallel, aggregated). Their specs are what the model sees; the
calls themselves never run here: the delegation processor (processors/delegation.py) turns
them into ChildrenStarted and the driver's child runner (runtime/children.py) runs the
children. A driver without them answers the call with this module's error."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from loopstream.tools.registry import ToolError, tool


class ChildTask(BaseModel):
    """One child of spawn_agents."""

    model_config = ConfigDict(extra="forbid")
    task: str
    agent: str | None = None


def _unavailable() -> str:
    raise ToolError("this driver runs no sub-agents (no delegation processor or child runner)",
                    "delegation_unavailable")


@tool
def delegate(task: str, agent: str | None = None) -> str:
    """Give a self-contained sub-task to a sub-agent (a new session that sees only `task`) and
    get back its final answer. `agent`: a named agent definition; omitted: one like you."""
    return _unavailable()


@tool
def spawn_agents(tasks: list[ChildTask], mode: Literal["all", "first", "quorum"] = "all",
                 quorum: int | None = None) -> str:
    """Run several sub-agents in parallel, one per task ({"task": ..., "agent": optional name}),
    and get their results in the order given, each with its status. mode: all (wait for every
    one), first (the first successful answer; the others are stopped), quorum (stop once
    `quorum` have succeeded; default: a majority)."""
    return _unavailable()


@tool
def spawn_over(path: str, instruction: str, slice_chars: int = 4000, start_line: int = 1,
               end_line: int | None = None) -> str:
    """Work over a text file too long to read at once: its lines start_line..end_line are cut
    into slices of at most `slice_chars` characters, and one sub-agent per slice gets
    `instruction` and the slice; you get their answers in order (JSON, as spawn_agents). A
    range too long for that many sub-agents is split into ranges, each sub-agent calling
    spawn_over on its own range and combining the results (within the depth limit)."""
    return _unavailable()


TOOLS = [delegate, spawn_agents, spawn_over]
