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
from dataclasses import dataclass
from typing import Any, Literal

from loopstream.core.policy import PolicyError, load_policy, validate_permissions  # noqa: F401  (re-exported)

Action = Literal["allow", "deny", "ask"]
ACTIONS = ("allow", "deny", "ask")


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
