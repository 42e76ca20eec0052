"""SessionStart hooks: run by `run --agent` before the session exists. What they say is part of
what the session starts with, so it is recorded in its SessionStarted (the notes they add join
the system prompt; every decision is listed in the definition under `session_start_hooks`) and a
replay, fork or resume never runs them again. A hook that denies (or fails with on_error deny or
stop) refuses the start: nothing is written to the log."""
from __future__ import annotations

import json

from loopstream.processors.hooks import matching, run_hook
from loopstream.runtime.writer import SessionConfig


class StartRefused(Exception):
    """A SessionStart hook refused the session (one line: which hook and why)."""


def run_session_start(config: SessionConfig, goal: str) -> SessionConfig:
    """`config` with the SessionStart hooks' notes and decisions recorded; StartRefused if one refuses."""
    hooks = matching(config.policy.hooks, "SessionStart")
    if not hooks:
        return config
    records, notes = [], []
    for hook in hooks:
        decision, ms = run_hook(hook, {"hook_event_name": "SessionStart", "session_id": "", "cwd": config.workdir,
                                       "agent": config.agent, "goal": goal}, config.workdir)
        records.append({"hook": hook.label, "decision": decision.decision, "reason": decision.reason,
                        "context": decision.context, "latency_ms": ms})
        if decision.decision in ("deny", "stop", "ask"):
            raise StartRefused(f"SessionStart hook {hook.label} refused the session: "
                               f"{decision.reason or decision.decision}")
        if decision.context:
            notes.append(decision.context)
    if notes:
        config.system_prompt = f"{config.system_prompt}\n\n" + "\n".join(notes)
    definition = json.loads(config.definition or "{}")
    definition["session_start_hooks"] = records
    config.definition = json.dumps(definition, sort_keys=True)
    return config
