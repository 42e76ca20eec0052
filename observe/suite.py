"""An eval suite file (TOML): cases (a goal and graders), agent variants, trials.

    name = "arithmetic"          # the suite's name (default: the file's stem)
    trials = 1                   # sessions per case and variant
    [agent]                      # every variant starts from this
    tools = ["add", "multiply"]
    max_steps = 6
    system_prompt = "…"
    [[variants]]                 # optional; none: one variant named "default"
    name = "terse"
    system_prompt = "…"
    [[cases]]
    id = "add"
    goal = "What is 2 + 2? Use the add tool."
    graders = [{ kind = "regex", pattern = "\\b4\\b" }]

Grader kinds: `exact` (value; `normalize` = true strips, folds case and spaces), `contains`
(value), `regex` (pattern, searched), `jsonschema` (schema: the answer parsed as JSON),
`python` (function = "file.py:name" beside the suite, or "module:name"), `judge` (rubric:
a reviewer model is asked PASS or FAIL). A misspelt key, a missing one or a bad value is
one error naming the file and the key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopstream.core.tomlfile import read_toml

GRADER_KINDS = {"exact": {"value", "normalize"}, "contains": {"value", "normalize"}, "regex": {"pattern"},
                "jsonschema": {"schema"}, "python": {"function"}, "judge": {"rubric"}}
AGENT_KEYS = {"system_prompt", "tools", "max_steps", "model", "provider", "policy", "agent"}
MAX_SUITE_BYTES = 4 * 1024 * 1024


class SuiteError(ValueError):
    """A suite file that cannot be used: the message names the file, the key and the reason."""


@dataclass(frozen=True)
class Grader:
    kind: str
    name: str
    options: dict[str, Any]


@dataclass(frozen=True)
class Case:
    id: str
    goal: str
    graders: tuple[Grader, ...]


@dataclass(frozen=True)
class Variant:
    name: str
    agent: dict[str, Any]  # SessionConfig fields (and provider/model) over the suite's [agent]


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    trials: int
    cases: tuple[Case, ...]
    variants: tuple[Variant, ...] = field(default=())


def load_suite(path: Path) -> Suite:
    """Read and check a suite file (see the module docstring); SuiteError names what is wrong."""
    where = str(path)
    raw = read_toml(path, f"suite {where}", MAX_SUITE_BYTES, SuiteError)
    _keys(raw, {"name", "trials", "agent", "variants", "cases"}, where, "")
    name = _str(raw.get("name", path.stem), where, "name")
    trials = raw.get("trials", 1)
    if not isinstance(trials, int) or isinstance(trials, bool) or not 1 <= trials <= 1000:
        raise SuiteError(f"{where}: trials: a whole number from 1 to 1000, not {trials!r}")
    base = raw.get("agent", {})
    if not isinstance(base, dict):
        raise SuiteError(f"{where}: [agent] must be a table")
    _keys(base, AGENT_KEYS, where, "agent.")
    variants = []
    for i, v in enumerate(_tables(raw.get("variants", []), where, "variants")):
        _keys(v, AGENT_KEYS | {"name"}, where, f"variants[{i}].")
        vname = _str(v.get("name", ""), where, f"variants[{i}].name")
        if not vname:
            raise SuiteError(f"{where}: variants[{i}].name: every variant needs a name")
        variants.append(Variant(vname, {**base, **{k: x for k, x in v.items() if k != "name"}}))
    if not variants:
        variants = [Variant("default", dict(base))]
    if len({v.name for v in variants}) != len(variants):
        raise SuiteError(f"{where}: variants: two variants have the same name")
    cases = []
    for i, c in enumerate(_tables(raw.get("cases", []), where, "cases")):
        at = f"cases[{i}]"
        _keys(c, {"id", "goal", "graders"}, where, at + ".")
        cid = _str(c.get("id", ""), where, f"{at}.id")
        goal = _str(c.get("goal", ""), where, f"{at}.goal")
        if not cid or not goal.strip():
            raise SuiteError(f"{where}: {at}: every case needs an id and a goal")
        graders = tuple(_grader(g, where, f"{at}.graders[{j}]", path.parent)
                        for j, g in enumerate(_tables(c.get("graders", []), where, f"{at}.graders")))
        if not graders:
            raise SuiteError(f"{where}: {at}.graders: a case needs at least one grader")
        cases.append(Case(cid, goal, graders))
    if not cases:
        raise SuiteError(f"{where}: no [[cases]]: a suite needs at least one case")
    if len({c.id for c in cases}) != len(cases):
        raise SuiteError(f"{where}: cases: two cases have the same id")
    return Suite(name, path, trials, tuple(cases), tuple(variants))


def _grader(g: dict, where: str, at: str, base_dir: Path) -> Grader:
    kind = g.get("kind")
    if kind not in GRADER_KINDS:
        raise SuiteError(f"{where}: {at}.kind: one of {', '.join(sorted(GRADER_KINDS))}, not {kind!r}")
    _keys(g, GRADER_KINDS[kind] | {"kind", "name"}, where, at + ".")
    opts = {k: v for k, v in g.items() if k not in ("kind", "name")}
    need = {"exact": "value", "contains": "value", "regex": "pattern", "jsonschema": "schema",
            "python": "function", "judge": "rubric"}[kind]
    if need not in opts:
        raise SuiteError(f"{where}: {at}: a {kind} grader needs `{need}`")
    if kind in ("exact", "contains", "regex", "python", "judge"):
        _str(opts[need], where, f"{at}.{need}")
    if kind == "regex":
        try:
            re.compile(opts["pattern"])
        except re.error as exc:
            raise SuiteError(f"{where}: {at}.pattern: not a regular expression: {exc}") from None
    if kind == "jsonschema" and not isinstance(opts["schema"], dict):
        raise SuiteError(f"{where}: {at}.schema: a table (the JSON schema)")
    if kind == "python":
        module, _, fn = opts["function"].partition(":")
        if not module or not fn:
            raise SuiteError(f"{where}: {at}.function: \"file.py:name\" or \"module:name\", not {opts['function']!r}")
        if module.endswith(".py"):
            opts["file"] = str((base_dir / module).resolve())
    name = _str(g.get("name", kind), where, f"{at}.name")
    return Grader(kind, name, opts)


def _keys(table: dict, allowed: set[str], where: str, prefix: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SuiteError(f"{where}: unknown key {prefix}{unknown[0]!s} (known: {', '.join(sorted(allowed))})")


def _tables(value: Any, where: str, key: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise SuiteError(f"{where}: {key}: an array of tables ([[{key}]])")
    return value


def _str(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise SuiteError(f"{where}: {key}: a string, not {type(value).__name__}")
    return value
