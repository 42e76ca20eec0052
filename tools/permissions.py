"""Permission rules for tool calls: allow, deny or ask a person, per tool and argument.

A policy file (TOML) lists rules; the first rule whose tool and argument patterns all
match decides. Patterns are globs (`rm *`, `*.py`) or, with a `re:` prefix, regular
expressions searched in the argument's text. The rules are recorded in the session's
SessionStarted config, so a replay sees the policy the session ran under.

    default = "allow"             # when no rule matches

    [[permissions]]
    tool = "shell"
    args = { command = "re:\\brm\\b" }
    action = "deny"
    reason = "no deletions"

    [[permissions]]
    tool = "write_file"
    args = { path = "*.py" }
    action = "ask"
"""
from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Action = Literal["allow", "deny", "ask"]
ACTIONS = ("allow", "deny", "ask")


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    rule: int | None  # index of the rule that matched; None: the default


def _matches(pattern: str, value: Any) -> bool:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if pattern.startswith("re:"):
        return re.search(pattern[3:], text) is not None
    return fnmatch.fnmatchcase(text, pattern)


def decide(permissions: dict, tool: str, arguments: dict) -> Decision:
    """The first matching rule's action, or the policy's default ("allow" if none)."""
    for i, rule in enumerate(permissions.get("rules", [])):
        if not fnmatch.fnmatchcase(tool, rule.get("tool", "*")):
            continue
        args = rule.get("args", {})
        if all(name in arguments and _matches(pat, arguments[name]) for name, pat in args.items()):
            reason = rule.get("reason") or f"rule {i + 1}: {rule.get('action')} {rule.get('tool', '*')}"
            return Decision(rule["action"], reason, i)
    default = permissions.get("default", "allow")
    return Decision(default, f"default: {default}", None)


def validate_permissions(permissions: dict, where: str = "policy") -> dict:
    default = permissions.get("default", "allow")
    if default not in ACTIONS:
        raise PolicyError(f"{where}: default must be one of {', '.join(ACTIONS)}, not {default!r}")
    for i, rule in enumerate(permissions.get("rules", []), 1):
        if rule.get("action") not in ACTIONS:
            raise PolicyError(f"{where}: rule {i} needs action = allow | deny | ask")
        if not isinstance(rule.get("args", {}), dict):
            raise PolicyError(f"{where}: rule {i}: args must be a table of argument = pattern")
        for pat in rule.get("args", {}).values():
            if isinstance(pat, str) and pat.startswith("re:"):
                try:
                    re.compile(pat[3:])
                except re.error as exc:
                    raise PolicyError(f"{where}: rule {i}: bad regular expression {pat!r}: {exc}") from None
    return permissions


def load_policy(path: str | Path) -> dict:
    """Read a policy file into the session config's `permissions` and `guardrails` entries."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy file {path} is not valid TOML: {exc}") from None
    unknown = set(raw) - {"default", "permissions", "guardrails"}
    if unknown:
        raise PolicyError(f"policy file {path}: unknown entries {', '.join(sorted(unknown))}")
    permissions = validate_permissions(
        {"default": raw.get("default", "allow"), "rules": raw.get("permissions", [])}, str(path))
    out: dict = {"permissions": permissions}
    if "guardrails" in raw:
        from loopstream.processors.guardrails import validate_guardrails

        out["guardrails"] = validate_guardrails(raw["guardrails"], str(path))
    return out
