"""Plugins: Python packages that declare an entry point in the group `loopstream.plugins`.

The entry point names an object (a module, a class instance, or a function returning one)
whose optional attributes say what it adds:

- `tools`: a list of `Tool` (`@loopstream.tools.registry.tool` functions);
- `skills`: folders holding skill folders (agents/skills.py), searched after the user's;
- `hooks`: hook tables (core/policy.py `Hook`), added to every agent started by `run`;
- `agents`: {name: agent table as in loopstream.toml}, below the user and project files;
- `processors`: processors added to the in-process runtime (`handle(event, state, now_ms)`);
- `providers`: {name: callable(model) -> Provider}, chosen with `--provider NAME`.

A plugin that fails to import, raises, or declares something of the wrong type is reported
(`Plugin.error`) and skipped; it never stops the harness.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from loopstream.tools.registry import Tool

GROUP = "loopstream.plugins"


@dataclass
class Plugin:
    name: str
    value: str  # the entry point's target, `module:attr`
    dist: str = ""  # the distribution that declares it
    tools: list[Tool] = field(default_factory=list)
    skills: list[Path] = field(default_factory=list)
    hooks: list[dict[str, Any]] = field(default_factory=list)
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    processors: list[Any] = field(default_factory=list)
    providers: dict[str, Callable[..., Any]] = field(default_factory=dict)
    error: str = ""  # why it was skipped ("" when loaded)

    def adds(self) -> str:
        """What it adds, one line."""
        parts = [f"{len(v)} {k}: {', '.join(names)}" for k, v, names in (
            ("tools", self.tools, [t.name for t in self.tools]),
            ("skill folders", self.skills, [str(p) for p in self.skills]),
            ("hooks", self.hooks, [str(h.get("event", "?")) for h in self.hooks]),
            ("agents", self.agents, list(self.agents)),
            ("processors", self.processors, [getattr(p, "name", type(p).__name__) for p in self.processors]),
            ("providers", self.providers, list(self.providers))) if v]
        return "; ".join(parts) or "nothing"


def _list(obj: Any, attr: str, kind: type | tuple[type, ...], plugin: str) -> list:
    value = getattr(obj, attr, None) or []
    if not isinstance(value, list | tuple) or not all(isinstance(v, kind) for v in value):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TypeError(f"`{attr}` must be a list of {names}")
    return list(value)


def _dict(obj: Any, attr: str) -> dict:
    value = getattr(obj, attr, None) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TypeError(f"`{attr}` must be a dict keyed by name")
    return dict(value)


def load_entry_point(ep: metadata.EntryPoint) -> Plugin:
    """One plugin, loaded; a failure is recorded in `error`, never raised."""
    dist = getattr(getattr(ep, "dist", None), "name", "") or ""
    plugin = Plugin(ep.name, ep.value, dist)
    try:
        obj = ep.load()
        if callable(obj) and not isinstance(obj, type) and not hasattr(obj, "tools") and not hasattr(obj, "agents"):
            obj = obj()
        plugin.tools = _list(obj, "tools", Tool, ep.name)
        plugin.skills = [Path(p) for p in _list(obj, "skills", (str, Path), ep.name)]
        plugin.hooks = _list(obj, "hooks", dict, ep.name)
        plugin.agents = _dict(obj, "agents")
        plugin.processors = _list(obj, "processors", object, ep.name)
        plugin.providers = _dict(obj, "providers")
        bad = [p for p in plugin.processors if not callable(getattr(p, "handle", None))]
        if bad:
            raise TypeError("`processors` must have a handle(event, state, now_ms) method")
    except Exception as exc:  # a broken plugin is reported and skipped
        return Plugin(ep.name, ep.value, dist, error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
    return plugin


def discover(entry_points: Iterable[metadata.EntryPoint] | None = None) -> list[Plugin]:
    """Every installed plugin (the group's entry points), loaded or with its error."""
    eps = entry_points if entry_points is not None else metadata.entry_points(group=GROUP)
    seen: set[str] = set()
    out = []
    for ep in sorted(eps, key=lambda e: e.name):
        if ep.name in seen:  # the same distribution seen twice on sys.path
            continue
        seen.add(ep.name)
        out.append(load_entry_point(ep))
    return out


def loaded(plugins: list[Plugin]) -> list[Plugin]:
    return [p for p in plugins if not p.error]
