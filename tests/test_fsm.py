"""The state machine table: legal moves, rejected illegal ones, who acts in each state, and
the lookup the fold and the live check use agreeing with the `transitions` machine itself."""
from __future__ import annotations

import itertools

import pytest
import transitions

from loopstream.core import events as ev
from loopstream.core import fsm
from loopstream.core.conversation import ToolCall
from loopstream.core.fsm import (
    ANNOTATIONS,
    CONDITIONS,
    LEGAL,
    MACHINE,
    STATES,
    TERMINAL,
    TRANSITIONS,
    UNCONDITIONAL,
    IllegalTransition,
    Status,
    mermaid,
    next_state,
    owed_by,
)
from loopstream.core.state import Delegation, PendingCall, SessionState, apply, fold
from tests.helpers import SAMPLE_PAYLOADS, make_event

BY_TYPE = {p.TYPE: p for p in SAMPLE_PAYLOADS}
ADD = ToolCall(call_id="c0", name="add")


def _state(status: Status, holds: dict[str, bool]) -> SessionState:
    """A folded state in `status` where each condition of the table holds or not, as asked."""
    s = SessionState(status=status)
    if not holds["tools_settled"]:
        s.pending_calls = {"c0": PendingCall(ADD, 0)}
    if not holds["no_open_approvals"]:  # an open approval is a pending call's: it is never settled
        s.pending_calls = {"c0": PendingCall(ADD, 0, approval="rule 1: ask add")}
    if not holds["reply_without_calls"]:
        s.last_reply_parsed = {"c0": ("{}", ADD)}
    s.goal_passed = holds.get("goal_passed", False)
    if holds.get("children_open"):  # a delegation is a pending call's too: open only where calls are
        s.delegations = {"c0": Delegation("c0", 0, "e0", 0, "all", 1, ())}
    assert {name: cond(s) for name, cond in CONDITIONS.items()} == holds
    return s


class _Model:
    """What `transitions` moves: a state attribute, and the table's conditions as methods."""

    def __init__(self, session: SessionState) -> None:
        self.session = session

    def __getattr__(self, name: str):
        if name in CONDITIONS:
            return lambda: CONDITIONS[name](self.session)
        raise AttributeError(name)


def _machine_answer(session: SessionState, event_type: str) -> str:
    """Trigger the one machine on a model of `session`: where it went, or "illegal"."""
    model = _Model(session)
    MACHINE.add_model(model, initial=Status(session.status))
    try:
        moved = model.trigger(event_type)
    except (transitions.MachineError, AttributeError):
        return "illegal"
    finally:
        MACHINE.remove_model(model)
    return str(model.state) if moved else "illegal"


def _fold_answer(session: SessionState, event_type: str) -> str:
    """What `apply` decides for this state: LEGAL first, then the unconditional shortcut,
    then the conditional rows (`next_state`)."""
    key = (session.status, event_type)
    if key not in LEGAL:
        return "illegal"
    if key in UNCONDITIONAL:
        return str(UNCONDITIONAL[key])
    try:
        return str(next_state(session, event_type))
    except IllegalTransition:
        return "illegal"


def _lookup_answer(session: SessionState, event_type: str) -> str:
    try:
        return str(next_state(session, event_type))
    except IllegalTransition:
        return "illegal"


# Every combination of the conditions a state can have (an open approval belongs to a pending call,
# so "no open approvals" fails only where "tools settled" fails too; so does an open delegation).
HOLDS = [h for values in itertools.product((True, False), repeat=len(CONDITIONS))
         if not ((h := dict(zip(CONDITIONS, values, strict=True)))["tools_settled"]
                 and (not h["no_open_approvals"] or h["children_open"]))]


@pytest.mark.parametrize("status", list(Status))
def test_the_fold_lookup_answers_as_the_transitions_machine_on_every_state_event_and_condition(status) -> None:
    disagree = []
    for event_type, holds in itertools.product(sorted(ev.PAYLOAD_TYPES), HOLDS):
        machine = _machine_answer(_state(status, holds), event_type)
        for name, answer in (("fold", _fold_answer), ("next_state", _lookup_answer)):
            mine = answer(_state(status, holds), event_type)
            if mine != machine:
                disagree.append((event_type, holds, name, mine, machine))
    assert not disagree


def test_the_machine_is_built_once_and_the_live_check_builds_none(monkeypatch) -> None:
    def no_machine(*args, **kwargs):
        raise AssertionError("a transitions.Machine was built")

    monkeypatch.setattr(transitions.Machine, "__init__", no_machine)
    order = ["SessionStarted", "GoalReceived", "ModelRequested", "ModelResponded", "ToolRequested"]
    state = fold([make_event(BY_TYPE[t], seq=i) for i, t in enumerate(order)], transition=fsm.machine_next_state)
    assert state.status == "awaiting_tools"
    with pytest.raises(IllegalTransition):
        apply(state, make_event(BY_TYPE["SessionStarted"], seq=5), fsm.machine_next_state)


def test_owed_by_says_who_acts_in_each_state() -> None:
    assert {s: owed_by(s) for s in Status} == {
        "new": None, "idle": None, "done": None, "failed": None, "cancelled": None,
        "planning": "orchestrator", "acting": "orchestrator", "backing_off": "orchestrator",
        "awaiting_model": "model", "compacting": "compaction", "awaiting_tools": "tools",
        "awaiting_approval": "person", "verifying": "verifier", "paused": None,
        "awaiting_children": "children",
    }
    assert fsm.also_owed_by("awaiting_approval") == "tools"  # the calls not waiting on a person
    assert {s for s in Status if fsm.also_owed_by(s)} == {"awaiting_approval", "awaiting_children"}
    assert owed_by(Status.PLANNING) == owed_by("planning")


def test_states_are_the_strings_sessions_always_stored() -> None:
    assert Status.AWAITING_TOOLS == "awaiting_tools" and repr(Status.DONE) == "'done'"
    assert [row.status for row in STATES] == list(Status)
    state = fold([make_event(BY_TYPE[t], seq=i) for i, t in enumerate(["SessionStarted", "GoalReceived"])])
    assert state == SessionState(**{**vars_of(state), "status": "planning"})


def vars_of(state: SessionState) -> dict:
    return {name: getattr(state, name) for name in state.__slots__}


def test_happy_path_walks_the_table() -> None:
    order = ["SessionStarted", "GoalReceived", "ModelRequested", "ModelResponded", "ToolRequested",
             "ToolCompleted", "ModelRequested", "ModelResponded", "SessionFinished"]
    state = SessionState()
    seen = []
    for seq, t in enumerate(order):
        apply(state, make_event(BY_TYPE[t], seq=seq))
        seen.append(state.status)
    assert seen == ["idle", "planning", "awaiting_model", "acting", "awaiting_tools",
                    "planning", "awaiting_model", "acting", "done"]


def test_tool_results_wait_for_every_pending_call() -> None:
    state = fold([make_event(BY_TYPE[t], seq=i) for i, t in enumerate(
        ["SessionStarted", "GoalReceived", "ModelRequested", "ModelResponded"])])
    apply(state, make_event(ev.ToolRequested(call_id="a", name="add", arguments_json="{}", step=1), seq=4))
    apply(state, make_event(ev.ToolRequested(call_id="b", name="add", arguments_json="{}", step=1), seq=5))
    apply(state, make_event(ev.ToolCompleted(call_id="a", name="add", result="1", latency_ms=0), seq=6))
    assert state.status == "awaiting_tools"
    apply(state, make_event(ev.ToolFailed(call_id="b", name="add", error_kind="x", message="y", latency_ms=0), seq=7))
    assert state.status == "planning"


def test_illegal_event_is_rejected_with_a_clear_error_and_state_untouched() -> None:
    state = fold([make_event(BY_TYPE["SessionStarted"], seq=0)])
    before = (state.status, state.seq, list(state.messages))
    with pytest.raises(IllegalTransition, match=r"event ModelResponded is not legal in state 'idle' at seq 1"):
        apply(state, make_event(BY_TYPE["ModelResponded"], seq=1))
    assert (state.status, state.seq, list(state.messages)) == before
    with pytest.raises(IllegalTransition, match=r"^event ToolCompleted is not legal in state 'acting'$"):
        next_state(SessionState(status=Status.ACTING), "ToolCompleted")


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_nothing_but_an_annotation_follows_a_terminal_state(terminal: str) -> None:
    for t in ev.PAYLOAD_TYPES:
        # an eval's grade, a person's feedback, a SessionEnd hook's decision: the session stays as it ended
        if t in ANNOTATIONS or t == "HookDecided":
            assert next_state(SessionState(status=terminal), t) == terminal
            continue
        with pytest.raises(IllegalTransition):
            next_state(SessionState(status=terminal), t)


@pytest.mark.parametrize("status", sorted(set(Status) - TERMINAL))
def test_an_annotation_is_refused_before_the_session_ended(status: str) -> None:
    for t in ANNOTATIONS:
        if t == "MemoryRemembered" and status in ("awaiting_tools", "awaiting_approval"):  # the remember tool's
            assert next_state(SessionState(status=status), t) == status
            continue
        with pytest.raises(IllegalTransition):
            next_state(SessionState(status=status), t)


def test_every_state_is_reachable_every_event_type_has_a_row_and_the_diagram_says_who_acts() -> None:
    dests = {d for _, _, d, _ in TRANSITIONS} | {"new"}
    assert dests == set(Status)
    assert {t for t, *_ in TRANSITIONS} == set(ev.PAYLOAD_TYPES)
    diagram = mermaid()
    for row in STATES:
        assert f"    {row.status} : " in diagram
    assert "    awaiting_approval : owed by person and tools (" in diagram
    assert "    planning : owed by orchestrator (" in diagram


def test_an_event_refused_by_its_condition_leaves_the_state_untouched() -> None:
    """(acting, UserMessage) is legal only if the last reply had no calls: a condition read
    once the payload is applied; the refused message must not reach the conversation."""
    order = ["SessionStarted", "GoalReceived", "ModelRequested", "ModelResponded"]  # the reply has a call
    state = fold([make_event(BY_TYPE[t], seq=i) for i, t in enumerate(order)])
    before = (state.status, state.seq, list(state.messages))
    with pytest.raises(IllegalTransition, match=r"event UserMessage is not legal in state 'acting' at seq 4"):
        apply(state, make_event(BY_TYPE["UserMessage"], seq=4))
    assert (state.status, state.seq, list(state.messages)) == before
