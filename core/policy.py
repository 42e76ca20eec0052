"""A session's policy: permission rules and guardrails, read from a TOML policy file and
validated before a session starts (recorded in SessionStarted's config)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import jsonschema

ACTIONS = ("allow", "deny", "ask")
POLICIES = ("tell_model", "stop")


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and the problem."""



class GuardrailError(ValueError):
    pass


def validate_guardrails(cfg: dict, where: str = "policy") -> dict:
    for key in ("input_deny", "output_deny", "tool_deny"):
        for pattern in cfg.get(key, []):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise GuardrailError(f"{where}: guardrails.{key}: bad regular expression {pattern!r}: {exc}") from None
    for key in ("on_output", "on_tool_call"):
        if cfg.get(key, "tell_model") not in POLICIES:
            raise GuardrailError(f"{where}: guardrails.{key} must be tell_model or stop")
    if "output_schema" in cfg:
        try:
            jsonschema.Draft202012Validator.check_schema(cfg["output_schema"])
        except jsonschema.SchemaError as exc:
            raise GuardrailError(f"{where}: guardrails.output_schema is not a JSON schema: {exc.message}") from None
    return cfg



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
        out["guardrails"] = validate_guardrails(raw["guardrails"], str(path))
    return out
