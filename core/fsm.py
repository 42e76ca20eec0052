"""The agent loop's state machine: the one table of states (and who acts in each) and
transitions.

A trigger is an event type. Appending an event is legal only if the table has a row for
(current state, event type) whose condition holds; anything else is rejected with
`IllegalTransition`. The table builds one `transitions.Machine` (`MACHINE`, at import), and
every lookup is read off that machine's own transitions: `next_state` (with `LEGAL` and
`UNCONDITIONAL`) answers for the fold and for the live check before an append alike, so the
two cannot disagree. tests/test_fsm.py triggers `MACHINE` itself on every (state, event,
condition) and proves the lookup answers as it does.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

from transitions import Machine, MachineError

from loopstream.core.events import PAYLOAD_TYPES, events_table


class Status(StrEnum):
    """A session's state. The values are the strings folds have always stored and compared,
    so `Status.PLANNING == "planning"` and old sessions fold unchanged."""

    NEW = "new"
    IDLE = "idle"
    PLANNING = "planning"
    AWAITING_MODEL = "awaiting_model"
    BACKING_OFF = "backing_off"
    COMPACTING = "compacting"
    ACTING = "acting"
    AWAITING_TOOLS = "awaiting_tools"
    AWAITING_APPROVAL = "awaiting_approval"
    VERIFYING = "verifying"
    AWAITING_CHILDREN = "awaiting_children"
    PAUSED = "paused"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __repr__(self) -> str:  # messages keep showing 'planning', as when states were plain strings
        return repr(self.value)


S = Status
# Who acts: a processor's `name`, or a person (`loopstream approve` / `deny`, `Runtime.record`).
ORCHESTRATOR, MODEL, COMPACTION, TOOLS, PERSON = "orchestrator", "model", "compaction", "tools", "person"
HOOKS = "hooks"  # the SessionEnd hooks, owed once a session ended with such hooks (core/state.py open_work)
VERIFIER = "verifier"
CHILDREN = "children"  # the driver's child runner (runtime/children.py): runs child sessions, reports them


class StateRow(NamedTuple):
    status: Status
    owed_by: str | None  # who must act for the session to move on; None: nobody (it waits, or it ended)
    also_owed_by: str | None  # who else still has owed work in this state
    meaning: str


# The driver reads "owed by" to decide what work is owed; no processor repeats the check.
STATES: tuple[StateRow, ...] = (
    #        state                 owed by       also   meaning
    StateRow(S.NEW,                None,         None,  "nothing yet"),
    StateRow(S.IDLE,               None,         None,  "started, waits for a goal or a person's message"),
    StateRow(S.PLANNING,           ORCHESTRATOR, None,  "decide the next step from the latest event"),
    StateRow(S.AWAITING_MODEL,     MODEL,        None,  "a model request is in flight"),
    StateRow(S.BACKING_OFF,        ORCHESTRATOR, None,  "a failed model call waits for its retry time"),
    StateRow(S.COMPACTING,         COMPACTION,   None,  "the context is over budget, older turns are summarized"),
    StateRow(S.ACTING,             ORCHESTRATOR, None,  "the model answered, request its tool calls or finish"),
    StateRow(S.AWAITING_TOOLS,     TOOLS,        None,  "tool calls are in flight"),
    # A person approves or denies the calls a rule says to ask about; meanwhile the tool
    # processor still runs the session's other pending calls (those not waiting on a person).
    StateRow(S.AWAITING_APPROVAL,  PERSON,       TOOLS, "a person approves or denies a call, "
                                                        "the tool processor runs the calls not waiting on one"),
    StateRow(S.VERIFYING,          VERIFIER,     None,  "goal mode: the goal's verify command checks the answer"),
    # Sub-agents (docs/subagents.md): child sessions run; the tools still run the reply's other calls.
    StateRow(S.AWAITING_CHILDREN,  CHILDREN,     TOOLS, "child sessions a delegation started are running, "
                                                        "the tool processor runs the reply's other calls"),
    StateRow(S.PAUSED,             None,         None,  "paused by a person; waits for GoalResumed"),
    StateRow(S.DONE,               None,         None,  "finished with an answer"),
    StateRow(S.FAILED,             None,         None,  "ended by an error or a budget"),
    StateRow(S.CANCELLED,          None,         None,  "ended by a person"),
)
TERMINAL = frozenset({S.DONE, S.FAILED, S.CANCELLED})
LIVE = [row.status for row in STATES if row.status not in TERMINAL and row.status is not S.NEW]

PAUSABLE = [S.PLANNING, S.BACKING_OFF]  # between steps: a pause takes effect at once
BUSY = [S.AWAITING_MODEL, S.COMPACTING, S.ACTING, S.AWAITING_TOOLS, S.AWAITING_APPROVAL, S.VERIFYING]

# trigger (event type)    source                 destination            condition
TRANSITIONS: list[tuple[str, Status | list[Status], Status, str | None]] = [
    ("SessionStarted",      S.NEW,                 S.IDLE,                None),
    ("GoalReceived",        S.IDLE,                S.PLANNING,            None),
    # the model
    ("ModelRequested",      S.PLANNING,            S.AWAITING_MODEL,      None),
    ("ModelRequested",      S.BACKING_OFF,         S.AWAITING_MODEL,      None),
    ("ModelResponded",      S.AWAITING_MODEL,      S.ACTING,              None),
    ("ModelFailed",         S.AWAITING_MODEL,      S.PLANNING,            None),
    ("RetryScheduled",      S.PLANNING,            S.BACKING_OFF,         None),  # a model call
    ("ModelFallback",       S.PLANNING,            S.PLANNING,            None),
    ("CompactionRequested", S.PLANNING,            S.COMPACTING,          None),
    ("ContextCompacted",    S.COMPACTING,          S.PLANNING,            None),
    ("ContextOverBudget",   S.PLANNING,            S.PLANNING,            None),  # nothing to compact: a warning
    # tool calls
    ("ToolRequested",       S.ACTING,              S.AWAITING_TOOLS,      None),
    ("ToolRequested",       S.AWAITING_TOOLS,      S.AWAITING_TOOLS,      None),
    ("ToolCompleted",       S.AWAITING_TOOLS,      S.PLANNING,            "tools_settled"),
    ("ToolCompleted",       S.AWAITING_TOOLS,      S.AWAITING_TOOLS,      None),
    ("ToolCompleted",       S.AWAITING_APPROVAL,   S.AWAITING_APPROVAL,   None),
    ("ToolFailed",          S.AWAITING_TOOLS,      S.PLANNING,            "tools_settled"),
    ("ToolFailed",          S.AWAITING_TOOLS,      S.AWAITING_TOOLS,      None),
    ("ToolFailed",          S.AWAITING_APPROVAL,   S.AWAITING_APPROVAL,   None),
    ("RetryScheduled",      S.AWAITING_TOOLS,      S.AWAITING_TOOLS,      None),  # a tool call
    ("RetryScheduled",      S.AWAITING_APPROVAL,   S.AWAITING_APPROVAL,   None),
    # The workspace was snapshotted before a side-effect tool runs (loopstream.tools.checkpoint).
    ("WorkspaceCheckpointed", S.AWAITING_TOOLS,    S.AWAITING_TOOLS,      None),
    ("WorkspaceCheckpointed", S.AWAITING_APPROVAL, S.AWAITING_APPROVAL,   None),  # another call waits for a person
    # guardrails, the reviewer model, a person's approval
    ("GuardrailTripped",    S.PLANNING,            S.PLANNING,            None),  # input: SessionFailed follows
    ("GuardrailTripped",    S.ACTING,              S.PLANNING,            None),  # output: the model is told
    ("LoopDetected",        S.ACTING,              S.PLANNING,            None),  # the calls are answered, not run
    ("GuardrailTripped",    S.AWAITING_TOOLS,      S.PLANNING,            "tools_settled"),  # a blocked call settles
    ("GuardrailTripped",    S.AWAITING_TOOLS,      S.AWAITING_TOOLS,      None),
    ("GuardrailTripped",    S.AWAITING_APPROVAL,   S.AWAITING_APPROVAL,   None),
    ("ToolCallReviewed",    S.AWAITING_TOOLS,      S.AWAITING_TOOLS,      None),  # the reviewer model's verdict
    ("ToolCallReviewed",    S.AWAITING_APPROVAL,   S.AWAITING_APPROVAL,   None),  # another call waits for a person
    ("HookDecided",         S.AWAITING_TOOLS,      S.AWAITING_TOOLS,      None),  # a hook's decision on a call
    ("HookDecided",         S.AWAITING_APPROVAL,   S.AWAITING_APPROVAL,   None),
    # the other hook points: before / after a model call (and on its failure), before compaction
    ("HookDecided",         S.AWAITING_MODEL,      S.AWAITING_MODEL,      None),  # PreModelCall, Failure
    ("HookDecided",         S.ACTING,              S.ACTING,              None),  # PostModelCall
    ("HookDecided",         S.COMPACTING,          S.COMPACTING,          None),  # PreCompact
    ("ApprovalRequested",   [S.AWAITING_TOOLS, S.AWAITING_APPROVAL], S.AWAITING_APPROVAL, None),
    ("ApprovalDecided",     S.AWAITING_APPROVAL,   S.AWAITING_TOOLS,      "no_open_approvals"),
    ("ApprovalDecided",     S.AWAITING_APPROVAL,   S.AWAITING_APPROVAL,   None),
    # goal mode: a final answer is verified; a failure goes back to the model
    ("GoalVerificationRequested", S.ACTING,        S.VERIFYING,           None),
    ("GoalVerified",        S.VERIFYING,           S.ACTING,              "goal_passed"),  # then SessionFinished
    ("GoalVerified",        S.VERIFYING,           S.PLANNING,            None),
    # pause: at once between steps; pending (a self-transition) while something is in flight
    ("GoalPaused",          PAUSABLE,              S.PAUSED,              None),
    *[("GoalPaused", s, s, None) for s in BUSY],
    ("GoalResumed",         S.PAUSED,              S.PLANNING,            None),
    *[("GoalResumed", s, s, None) for s in BUSY],  # withdraws a pending pause
    # the end
    ("SessionFinished",     S.ACTING,              S.DONE,                None),
    ("SessionFailed",       LIVE,                  S.FAILED,              None),
    ("SessionCancelled",    LIVE,                  S.CANCELLED,           None),
    # A fork continues from the state its copied prefix folds to, whichever live state that
    # is (loopstream.replay.fork): one self-transition per live state.
    *[("SessionForked", s, s, None) for s in LIVE],
    # A person adds a message while neither the model nor a tool call is owed an answer.
    ("UserMessage",         [S.IDLE, S.PLANNING],  S.PLANNING,            None),
    ("UserMessage",         S.ACTING,              S.PLANNING,            "reply_without_calls"),
    # Sub-agents (docs/subagents.md): a delegate call starts children; the session waits in
    # awaiting_children while the calls that are not delegations go on as in awaiting_tools.
    ("ChildrenStarted",     [S.AWAITING_TOOLS, S.AWAITING_CHILDREN], S.AWAITING_CHILDREN, None),
    ("ChildrenStarted",     S.AWAITING_APPROVAL,   S.AWAITING_APPROVAL,   None),
    *[("ChildSettled", s, s, None) for s in (S.AWAITING_TOOLS, S.AWAITING_CHILDREN, S.AWAITING_APPROVAL)],
    *[(t, S.AWAITING_CHILDREN, S.PLANNING, "tools_settled") for t in ("ToolCompleted", "ToolFailed", "GuardrailTripped")],
    *[(t, S.AWAITING_CHILDREN, S.AWAITING_CHILDREN, "children_open")
      for t in ("ToolCompleted", "ToolFailed", "GuardrailTripped")],
    *[(t, S.AWAITING_CHILDREN, S.AWAITING_TOOLS, None) for t in ("ToolCompleted", "ToolFailed", "GuardrailTripped")],
    *[(t, S.AWAITING_CHILDREN, S.AWAITING_CHILDREN, None) for t in ("RetryScheduled",
      "WorkspaceCheckpointed", "ToolCallReviewed", "HookDecided", "GoalPaused", "GoalResumed")],
    ("ApprovalRequested",   S.AWAITING_CHILDREN,   S.AWAITING_APPROVAL,   None),
    # Annotations of an ended session (loopstream.observe): an eval's grade, a person's
    # feedback. They change no state and nothing is owed after them.
    *[(t, s, s, None) for t in ("EvalGraded", "FeedbackGiven") for s in (S.DONE, S.FAILED, S.CANCELLED)],
    # Memory (core/memory.py): what was recalled is recorded at the start, before the goal; the
    # `remember` tool's memory comes with its result; a lesson or a forget annotates an ended session.
    ("MemoryRecalled",      S.IDLE,                S.IDLE,                None),
    *[("MemoryRemembered", s, s, None) for s in (S.AWAITING_TOOLS, S.AWAITING_APPROVAL)],
    *[(t, s, s, None) for t in ("MemoryRemembered", "MemoryForgotten") for s in (S.DONE, S.FAILED, S.CANCELLED)],
]
# SessionEnd hooks decide once the session ended (owed by the hooks processor: core/state.py open_work).
TRANSITIONS += [("HookDecided", s, s, None) for s in (S.DONE, S.FAILED, S.CANCELLED)]
# The annotation types: legal once a session ended, they leave its state as it was (a
# MemoryRemembered is also the `remember` tool's, with its result, while tools run).
ANNOTATIONS = frozenset({"EvalGraded", "FeedbackGiven", "MemoryRemembered", "MemoryForgotten"})

# Conditions read the folded state *after* the event's payload was applied to it.
CONDITIONS: dict[str, Callable[[Any], bool]] = {
    "tools_settled": lambda state: not state.pending_calls,
    "no_open_approvals": lambda state: not state.open_approvals,
    "reply_without_calls": lambda state: not state.last_reply_calls,
    "goal_passed": lambda state: state.goal_passed,
    "children_open": lambda state: bool(state.delegations),
}

_OWED = {row.status: row for row in STATES}


def owed_by(status: str) -> str | None:
    """Who must act for a session in `status` to move on: "orchestrator", "model",
    "compaction" or "tools" (a processor's name), "person", or None (nobody: the session
    waits for a goal, or has ended). In awaiting_approval a person is owed a decision, and
    the tool processor still runs the calls that do not wait for one (`also_owed_by`)."""
    return _OWED[Status(status)].owed_by


def also_owed_by(status: str) -> str | None:
    """Who else still has owed work in `status`: "tools" in awaiting_approval, else None."""
    return _OWED[Status(status)].also_owed_by


class IllegalTransition(ValueError):
    def __init__(self, state: str, event_type: str, seq: int | None = None) -> None:
        at = f" at seq {seq}" if seq is not None else ""
        super().__init__(f"event {event_type} is not legal in state {str(state)!r}{at}")
        self.state, self.event_type, self.seq = state, event_type, seq


def _build_machine() -> Machine:
    unknown = {t for t, *_ in TRANSITIONS} - set(PAYLOAD_TYPES)
    if unknown:
        raise ValueError(f"fsm: the table names event types that have no payload class: {sorted(unknown)}")
    machine = Machine(model=None, states=list(Status), initial=S.NEW, auto_transitions=False,
                      ignore_invalid_triggers=False)
    for trigger, sources, dest, cond in TRANSITIONS:
        machine.add_transition(trigger, sources, dest, conditions=[cond] if cond else [])
    return machine


MACHINE = _build_machine()  # the one machine: every lookup below is read off it


def _condition(transition: Any) -> str | None:
    conds = transition.conditions
    if len(conds) > 1 or (conds and (not conds[0].target or not isinstance(conds[0].func, str))):
        raise ValueError(f"fsm: {transition}: the lookup takes at most one named condition per row")
    return conds[0].func if conds else None


def _rows(machine: Machine) -> dict[tuple[Status, str], tuple[tuple[Status, str | None], ...]]:
    """(state, event type) -> the machine's rows in the order it tries them: (destination, condition)."""
    rows = {}
    for trigger, event in machine.events.items():
        for source, transitions in event.transitions.items():
            if transitions:
                rows[(machine.get_state(source).value, trigger)] = tuple(
                    (machine.get_state(t.dest).value, _condition(t)) for t in transitions)
    return rows


_ROWS = _rows(MACHINE)
LEGAL: frozenset[tuple[str, str]] = frozenset(_ROWS)  # (state, event type) pairs with a row
# (state, event type) -> destination, where the first row has no condition: the fold's shortcut.
UNCONDITIONAL: dict[tuple[str, str], Status] = {k: rows[0][0] for k, rows in _ROWS.items() if rows[0][1] is None}
# (state, event type) pairs whose every row has a condition: legal or not only once the
# payload is applied (acting + UserMessage), so the fold asks on a copy first.
CONDITIONAL_ONLY: frozenset[tuple[str, str]] = frozenset(
    k for k, rows in _ROWS.items() if all(cond is not None for _, cond in rows))


def next_state(state: Any, event_type: str, seq: int | None = None) -> Status:
    """Where `state` (a folded SessionState, its payload already applied) goes on
    `event_type`, as MACHINE would move it; raises IllegalTransition. Microseconds: the
    fold and the live check before every append use it."""
    for dest, cond in _ROWS.get((state.status, event_type), ()):
        if cond is None or CONDITIONS[cond](state):
            return dest
    raise IllegalTransition(state.status, event_type, seq)


# The live check before an append (runtime, worker, fork) is the same lookup.
machine_next_state = next_state


class _Probe:
    """A model `transitions` can move: its state, and the conditions read off a folded state."""

    def __init__(self, state: Any) -> None:
        self.session = state
        self.state = Status(state.status)

    def __getattr__(self, name: str) -> Any:
        if name in CONDITIONS:
            return lambda: CONDITIONS[name](self.session)
        raise AttributeError(name)


def ask_machine(state: Any, event_type: str, seq: int | None = None) -> Status:
    """The question `next_state` answers, asked of MACHINE itself: it is triggered on a
    throwaway model of `state` (tens of µs; tests prove the lookup agrees)."""
    probe = _Probe(state)
    event = MACHINE.events.get(event_type)
    try:
        moved = event is not None and event.trigger(probe)
    except MachineError:
        moved = False
    if not moved:
        raise IllegalTransition(state.status, event_type, seq)
    return probe.state


def mermaid() -> str:
    """The table drawn as a Mermaid state diagram (docs/architecture.md embeds it): each
    state says who acts in it."""
    lines = ["stateDiagram-v2", "    [*] --> new"]
    for row in STATES:  # each state's description says who acts in it
        who = "nobody acts" if row.owed_by is None else f"owed by {row.owed_by}"
        lines.append(f"    {row.status} : {who}" + (f" and {row.also_owed_by}" if row.also_owed_by else "")
                     + f" ({row.meaning})")
    for trigger, sources, dest, cond in TRANSITIONS:
        for src in sources if isinstance(sources, list) else [sources]:
            label = trigger + (f" [{cond}]" if cond else "")
            lines.append(f"    {src} --> {dest}: {label}")
    lines += [f"    {s} --> [*]" for s in sorted(TERMINAL)]
    return "\n".join(lines)


def write_docs(path: str) -> None:
    """Refresh the diagram (fsm markers) and the event table (events markers) of a Markdown file."""
    doc = Path(path)
    text = doc.read_text()
    for name, body in (("fsm", f"```mermaid\n{mermaid()}\n```"), ("events", events_table())):
        block = f"<!-- {name}:begin -->\n{body}\n<!-- {name}:end -->"
        text = re.sub(rf"<!-- {name}:begin -->.*?<!-- {name}:end -->", lambda _, b=block: b, text, flags=re.S)
    doc.write_text(text)


if __name__ == "__main__":  # python -m loopstream.core.fsm docs/architecture.md
    write_docs(sys.argv[1]) if len(sys.argv) > 1 else print(mermaid())
