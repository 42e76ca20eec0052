"""`loopstream agents` and `loopstream plugins`: what the project file, the user file and the
installed plugins define (docs/composability.md)."""
from __future__ import annotations

from pathlib import Path

from loopstream.agents import plugins as plugin_mod
from loopstream.agents import skills as skill_mod
from loopstream.agents.assemble import open_project, skill_folders
from loopstream.agents.project import ProjectError
from loopstream.cli import output
from loopstream.cli.common import UserError


def agents() -> None:
    """List the agents of loopstream.toml (found upward from here), the user file and plugins."""
    found = plugin_mod.discover()
    for p in found:
        if p.error:
            output.warning(f"plugin {p.name} ({p.value}) skipped: {p.error}")
    try:
        project = open_project(Path.cwd(), found)
    except ProjectError as exc:
        raise UserError(str(exc)) from None
    skills, skipped = skill_mod.discover(skill_folders(project, Path.cwd(), found))
    for warning in skipped:
        output.warning(warning)
    if not project.agents:
        output.note("no agents defined (add [agents.NAME] to a loopstream.toml)")
        return
    output.table(["agent", "model", "tools", "skills", "from", "description"], [
        (a.name, f"{a.spec.provider or '(env)'}:{a.spec.model or '(default)'}",
         ",".join(a.spec.tools) if a.spec.tools is not None else "(built-in)",
         ",".join(a.spec.skills), str(a.source), a.spec.description)
        for a in project.agents.values()])
    if skills:
        output.table(["skill", "description", "file"], [(s.name, s.description[:80], str(s.path))
                                                        for s in skills.values()])


def plugins() -> None:
    """List the installed plugins (entry points `loopstream.plugins`) and what each adds."""
    found = plugin_mod.discover()
    if not found:
        output.note(f"no plugins installed (entry point group {plugin_mod.GROUP})")
        return
    output.table(["plugin", "target", "distribution", "adds"],
                 [(p.name, p.value, p.dist, f"BROKEN, skipped: {p.error}" if p.error else p.adds()) for p in found])
