"""Skills in the SKILL.md format: a folder holding `SKILL.md`, YAML front matter (`name`,
`description`) then the instructions. Progressive disclosure: only names and descriptions go
into the system prompt; the model reads a skill's body with the `load_skill` tool, whose
result is a ToolCompleted event, so a replay never reads the file again.

Folders searched, first wins on a name: the project's `.loopstream/skills/`, the user's
(`<config dir>/skills`), then those plugins add. A hostile skill (huge file, bad YAML, missing
fields, a symlink, not UTF-8) is skipped with a warning naming the file and why.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from loopstream.tools.registry import Tool, ToolError, tool

MAX_SKILL_BYTES = 256_000
MAX_DESCRIPTION = 1024
NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


@dataclass(frozen=True)
class Skill:
    name: str
    description: str
    path: Path  # the SKILL.md
    body: str
    sha256: str


class SkillError(ValueError):
    """A skill that cannot be used: the message names the file and why."""


def read_skill(folder: Path) -> Skill:
    """The skill in `folder` (its SKILL.md), or SkillError naming the file and the problem."""
    path = folder / "SKILL.md"
    if folder.is_symlink() or path.is_symlink():
        raise SkillError(f"{path}: a symlink (skills must be real folders and files)")
    if not path.is_file():
        raise SkillError(f"{path}: no SKILL.md")
    data = path.read_bytes()
    if len(data) > MAX_SKILL_BYTES:
        raise SkillError(f"{path}: larger than {MAX_SKILL_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SkillError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    match = re.match(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)(.*)\Z", text, re.S)
    if match is None:
        raise SkillError(f"{path}: no YAML front matter (a first line '---', the fields, a line '---')")
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise SkillError(f"{path}: front matter is not valid YAML: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(meta, dict):
        raise SkillError(f"{path}: front matter must be a mapping with name and description")
    for key in ("name", "description"):
        if not isinstance(meta.get(key), str) or not meta[key].strip():
            raise SkillError(f"{path}: front matter: {key}: required (a non-empty string)")
    name, description = meta["name"].strip(), " ".join(meta["description"].split())
    if not NAME.match(name):
        raise SkillError(f"{path}: front matter: name: {name[:80]!r} is not lowercase letters, digits and hyphens")
    if len(description) > MAX_DESCRIPTION:
        raise SkillError(f"{path}: front matter: description: longer than {MAX_DESCRIPTION} characters")
    return Skill(name, description, path, match.group(2).strip(), hashlib.sha256(data).hexdigest())


def discover(folders: Iterable[Path]) -> tuple[dict[str, Skill], list[str]]:
    """Skills found in `folders` (each a folder of skill folders), in order, first wins on a
    name; and the warnings for those skipped."""
    found: dict[str, Skill] = {}
    warnings: list[str] = []
    for root in folders:
        if not root.is_dir():
            continue
        if root.is_symlink():
            warnings.append(f"skipped skills folder {root}: a symlink")
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir() or p.is_symlink()):
            try:
                skill = read_skill(folder)
            except (SkillError, OSError) as exc:
                warnings.append(f"skipped skill {exc}")
                continue
            if skill.name in found:
                warnings.append(f"skipped skill {skill.path}: {skill.name!r} is already defined by "
                                f"{found[skill.name].path}")
                continue
            found[skill.name] = skill
    return found, warnings


def select(available: dict[str, Skill], names: list[str], where: str) -> list[Skill]:
    """The skills an agent asked for (`*`: all); SkillError names an unknown one."""
    if "*" in names:
        return list(available.values())
    missing = [n for n in names if n not in available]
    if missing:
        raise SkillError(f"{where}: unknown skill {missing[0]!r} (found: {', '.join(sorted(available)) or 'none'})")
    return [available[n] for n in names]


def skills_prompt(skills: list[Skill]) -> str:
    """What the context holds of the skills: names and descriptions, and how to load one."""
    lines = [f"- {s.name}: {s.description}" for s in skills]
    return ("Skills you can load (call load_skill with the name to read its instructions before you use it):\n"
            + "\n".join(lines))


def load_skill_tool(skills: list[Skill]) -> Tool:
    """The `load_skill` tool over `skills` (bodies read when found; the result is an event)."""
    by_name = {s.name: s for s in skills}

    @tool(name="load_skill")
    def load_skill(name: str) -> str:
        """Read the full instructions of a skill listed in the system prompt."""
        skill = by_name.get(name)
        if skill is None:
            raise ToolError(f"no skill {name!r}; available: {', '.join(sorted(by_name)) or 'none'}", "unknown_skill")
        return f"# skill {skill.name}\n\n{skill.body}"

    return load_skill
