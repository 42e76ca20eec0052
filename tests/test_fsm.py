"""The state machine table: legal moves, rejected illegal ones, and the `transitions`
machine agreeing with the compiled lookup the fold uses."""
from __future__ import annotations

import itertools

import pytest

from loopstream.core import events as ev
from loopstream.core.fsm import (
    STATES,
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    machine_next_state,
    mermaid,
    next_state,
)
from loopstream.core.state import PendingCall, SessionState, apply, fold
from loopstream.providers.base import ToolCall
from tests.helpers import SAMPLE_PAYLOADS, make_event

BY_TYPE = {p.TYPE: p for p in SAMPLE_PAYLOADS}


def _state(status: str, pending: int) -> SessionState:
    s = SessionState(status=status)
    s.pending_calls = {f"c{i}": PendingCall(ToolCall(call_id=f"c{i}", name="add"), 0) for i in range(pending)}
    return s


@pytest.mark.parametrize(("status", "event_type", "pending"),
                         list(itertools.product(STATES, sorted(ev.PAYLOAD_TYPES), (0, 1))))
def test_transitions_machine_agrees_with_compiled_table(status: str, event_type: str, pending: int) -> None:
    def answer(fn):
        try:
            return fn(_state(status, pending), event_type)
        except IllegalTransition:
            return "illegal"

    assert answer(next_state) == answer(machine_next_state)


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


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_nothing_follows_a_terminal_state(terminal: str) -> None:
    for t in ev.PAYLOAD_TYPES:
        with pytest.raises(IllegalTransition):
            next_state(SessionState(status=terminal), t)


def test_every_state_is_reachable_and_drawn() -> None:
    dests = {d for _, _, d, _ in TRANSITIONS} | {"new"}
    assert dests == set(STATES)
    diagram = mermaid()
    for s in STATES:
        assert s in diagram
