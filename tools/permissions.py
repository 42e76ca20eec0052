"""Permission rules for tool calls: allow, deny or ask a person, per tool and argument.

A policy file (TOML, core/policy.py) lists rules; the first rule whose tool and argument
patterns all match decides. Patterns are globs (`rm *`, `*.py`) or, with a `re:` prefix,
regular expressions searched in the argument's text. The rules are part of the session's
policy, recorded in its SessionStarted, so a replay sees the policy the session ran under.

    [permissions]
    default = "allow"             # when no rule matches

    [[permissions.rules]]
    tool = "shell"
    args = { command = "re:\\brm\\b" }
    action = "deny"
    reason = "no deletions"

    [[permissions.rules]]
    tool = "write_file"
    args = { path = "*.py" }
    action = "ask"
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from typing import Any

from loopstream.core.policy import (  # noqa: F401  (re-exported)
    ACTIONS,
    Action,
    PermissionRule,
    Permissions,
    PolicyError,
    load_policy,
)


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


def decide(permissions: Permissions, tool: str, arguments: dict) -> Decision:
    """The first matching rule's action, or the policy's default."""
    for i, rule in enumerate(permissions.rules):
        if not fnmatch.fnmatchcase(tool, rule.tool):
            continue
        if all(name in arguments and _matches(pat, arguments[name]) for name, pat in rule.args.items()):
            return Decision(rule.action, rule.reason or f"rule {i + 1}: {rule.action} {rule.tool}", i)
    return Decision(permissions.default, f"default: {permissions.default}", None)
