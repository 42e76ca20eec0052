"""The agent loop's state machine: the one table of states and transitions.

A trigger is an event type. Appending an event is legal only if the table has a row
for (current state, event type) whose condition holds; anything else is rejected with
`IllegalTransition`. The table drives a `transitions.Machine` (used to check live
events and to draw the diagram) and a compiled lookup used by the fold on the hot
replay path; tests/test_fsm.py proves the two agree on every (state, event) pair.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transitions import Machine, MachineError

STATES = [
    "new",             # nothing yet
    "idle",            # session started, waiting for a goal
    "planning",        # the orchestrator will ask the model next
    "awaiting_model",  # a model request is in flight
    "backing_off",     # a failed model call waits for its retry time
    "compacting",      # the context is over budget: older turns are being summarized
    "acting",          # the model answered: run its tool calls, or finish
    "awaiting_tools",  # tool calls are in flight
    "awaiting_approval",  # a tool call waits for a person's approve / deny
    "done",
    "failed",
    "cancelled",
]
TERMINAL = frozenset({"done", "failed", "cancelled"})
LIVE = [s for s in STATES if s not in TERMINAL and s != "new"]

# trigger (event type)   source            dest               condition
TRANSITIONS: list[tuple[str, str | list[str], str, str | None]] = [
    ("SessionStarted",   "new",            "idle",            None),
    ("GoalReceived",     "idle",           "planning",        None),
    ("ModelRequested",   "planning",       "awaiting_model",  None),
    ("ModelResponded",   "awaiting_model", "acting",          None),
    ("ModelFailed",      "awaiting_model", "planning",        None),
    ("RetryScheduled",   "planning",       "backing_off",     None),  # a model call
    ("RetryScheduled",   "awaiting_tools", "awaiting_tools",  None),  # a tool call
    ("RetryScheduled",   "awaiting_approval", "awaiting_approval", None),
    ("ModelRequested",   "backing_off",    "awaiting_model",  None),
    ("ModelFallback",    "planning",       "planning",        None),
    ("GuardrailTripped", "planning",       "planning",        None),  # input: SessionFailed follows
    ("GuardrailTripped", "acting",         "planning",        None),  # output: the model is told
    ("GuardrailTripped", "awaiting_tools", "planning",        "tools_settled"),  # a blocked call settles
    ("GuardrailTripped", "awaiting_tools", "awaiting_tools",  None),
    ("GuardrailTripped", "awaiting_approval", "awaiting_approval", None),
    ("ToolCallReviewed", "awaiting_tools", "awaiting_tools",  None),  # the reviewer model's verdict
    ("ToolCallReviewed", "awaiting_approval", "awaiting_approval", None),  # another call waits for a person
    ("ApprovalRequested", ["awaiting_tools", "awaiting_approval"], "awaiting_approval", None),
    ("ApprovalDecided",  "awaiting_approval", "awaiting_tools", "no_open_approvals"),
    ("ApprovalDecided",  "awaiting_approval", "awaiting_approval", None),
    ("ToolCompleted",    "awaiting_approval", "awaiting_approval", None),
    ("ToolFailed",       "awaiting_approval", "awaiting_approval", None),
    ("CompactionRequested", "planning",    "compacting",      None),
    ("ContextCompacted", "compacting",     "planning",        None),
    ("ToolRequested",    "acting",         "awaiting_tools",  None),
    ("ToolRequested",    "awaiting_tools", "awaiting_tools",  None),
    ("ToolCompleted",    "awaiting_tools", "planning",        "tools_settled"),
    ("ToolCompleted",    "awaiting_tools", "awaiting_tools",  None),
    ("ToolFailed",       "awaiting_tools", "planning",        "tools_settled"),
    ("ToolFailed",       "awaiting_tools", "awaiting_tools",  None),
    # The workspace was snapshotted before a side-effect tool runs (loopstream.tools.checkpoint).
    ("WorkspaceCheckpointed", "awaiting_tools", "awaiting_tools", None),
    ("WorkspaceCheckpointed", "awaiting_approval", "awaiting_approval", None),  # another call waits for a person
    ("SessionFinished",  "acting",         "done",            None),
    ("SessionFailed",    LIVE,             "failed",          None),
    ("SessionCancelled", LIVE,             "cancelled",       None),
    # A fork continues from the state its copied prefix folds to, whichever live state that
    # is (loopstream.replay.fork): one self-transition per live state.
    *[("SessionForked", s, s, None) for s in LIVE],
    # A person adds a message while neither the model nor a tool call is owed an answer.
    ("UserMessage",      ["idle", "planning"], "planning",    None),
    ("UserMessage",      "acting",         "planning",        "reply_without_calls"),
]

# Conditions read the folded state *after* the event's payload was applied to it.
CONDITIONS: dict[str, Callable[[Any], bool]] = {
    "tools_settled": lambda state: not state.pending_calls,
    "no_open_approvals": lambda state: not state.open_approvals,
    "reply_without_calls": lambda state: not state.last_reply_calls,
}


class IllegalTransition(ValueError):
    def __init__(self, state: str, event_type: str, seq: int | None = None) -> None:
        at = f" at seq {seq}" if seq is not None else ""
        super().__init__(f"event {event_type} is not legal in state {state!r}{at}")
        self.state, self.event_type, self.seq = state, event_type, seq


def _compile() -> dict[tuple[str, str], list[tuple[str, str | None]]]:
    table: dict[tuple[str, str], list[tuple[str, str | None]]] = {}
    for trigger, sources, dest, cond in TRANSITIONS:
        for src in [sources] if isinstance(sources, str) else sources:
            table.setdefault((src, trigger), []).append((dest, cond))
    return table


_TABLE = _compile()
LEGAL: frozenset[tuple[str, str]] = frozenset(_TABLE)  # (state, event type) pairs with a row
# (state, event type) -> destination, where the first row has no condition: the fold's shortcut.
UNCONDITIONAL: dict[tuple[str, str], str] = {k: rows[0][0] for k, rows in _TABLE.items() if rows[0][1] is None}


def next_state(state: Any, event_type: str, seq: int | None = None) -> str:
    """Where `state` (a folded SessionState) goes on `event_type`; raises IllegalTransition."""
    for dest, cond in _TABLE.get((state.status, event_type), ()):
        if cond is None or CONDITIONS[cond](state):
            return dest
    raise IllegalTransition(state.status, event_type, seq)


class _Model:
    """Adapter so `transitions` can evaluate our conditions against a folded state."""

    def __init__(self, state: Any) -> None:
        self.session = state

    def __getattr__(self, name: str) -> Any:
        if name in CONDITIONS:
            return lambda: CONDITIONS[name](self.session)
        raise AttributeError(name)


def build_machine(state: Any) -> tuple[Machine, _Model]:
    """A `transitions.Machine` for one folded state, built from the same table."""
    model = _Model(state)
    machine = Machine(
        model=model,
        states=STATES,
        initial=state.status,
        auto_transitions=False,
        ignore_invalid_triggers=False,
    )
    for trigger, sources, dest, cond in TRANSITIONS:
        machine.add_transition(trigger, sources, dest, conditions=[cond] if cond else [])
    return machine, model


def machine_next_state(state: Any, event_type: str, seq: int | None = None) -> str:
    """The same question as `next_state`, answered by `transitions` (slower; live checks)."""
    _, model = build_machine(state)
    try:
        moved = model.trigger(event_type)
    except (MachineError, AttributeError):
        raise IllegalTransition(state.status, event_type, seq) from None
    if not moved:
        raise IllegalTransition(state.status, event_type, seq)
    return model.state


def mermaid() -> str:
    """The table drawn as a Mermaid state diagram (docs/architecture.md embeds it)."""
    lines = ["stateDiagram-v2", "    [*] --> new"]
    for trigger, sources, dest, cond in TRANSITIONS:
        for src in [sources] if isinstance(sources, str) else sources:
            label = trigger + (f" [{cond}]" if cond else "")
            lines.append(f"    {src} --> {dest}: {label}")
    lines += [f"    {s} --> [*]" for s in sorted(TERMINAL)]
    return "\n".join(lines)


def write_docs(path: str) -> None:
    """Refresh the diagram between the fsm markers of a Markdown file."""
    import re
    from pathlib import Path

    doc = Path(path)
    block = f"<!-- fsm:begin -->\n```mermaid\n{mermaid()}\n```\n<!-- fsm:end -->"
    doc.write_text(re.sub(r"<!-- fsm:begin -->.*?<!-- fsm:end -->", lambda _: block, doc.read_text(), flags=re.S))


if __name__ == "__main__":  # python -m loopstream.core.fsm docs/architecture.md
    import sys

    write_docs(sys.argv[1]) if len(sys.argv) > 1 else print(mermaid())


# owed_by: provisional (branch kernel); the fsm branch owns the table
# Who owes the next move in each state: the driver reads it (core/state.py `open_work`) to
# decide which processor is called, so no processor checks whether its event is still owed.
# awaiting_approval is owed by a person (approve / deny); open_work refines it per tool call:
# a call of the same reply that is not waiting for a person is still owed by the tools.
OWED_BY: dict[str, str | None] = {
    "new": None, "idle": None,
    "planning": "orchestrator", "acting": "orchestrator", "backing_off": "orchestrator",
    "awaiting_model": "model",
    "compacting": "compaction",
    "awaiting_tools": "tools",
    "awaiting_approval": "person",
    **{s: None for s in TERMINAL},
}


def owed_by(status: str) -> str | None:
    """The actor that owes the next move in `status`: "orchestrator", "model", "compaction",
    "tools" or "person"; None when nothing is owed (new, idle, terminal)."""
    return OWED_BY[status]
