"""The orchestrator: reads the folded state after each event and decides what comes next.

It never calls anything; it only chooses among the FSM's legal moves:
planning → ModelRequested (or fail on too many steps / model failures);
acting → one ToolRequested per tool call, or SessionFinished with the reply's text.
"""
from __future__ import annotations

import json

from loopstream.core import events as ev
from loopstream.core.events import derived_id
from loopstream.core.processor import Emit
from loopstream.core.state import SessionState

DEFAULT_MAX_MODEL_ATTEMPTS = 3


class Orchestrator:
    name = "orchestrator"
    triggers = frozenset(ev.PAYLOAD_TYPES) - {"SessionStarted"}

    def handle(self, event: ev.Event, state: SessionState) -> list[Emit]:
        if event.seq != state.seq:
            return []  # decisions are made on the head of the log only, never on a stale event
        if state.status == "planning":
            return self._plan(state)
        if state.status == "acting":
            return self._act(state)
        return []

    def _plan(self, state: SessionState) -> list[Emit]:
        max_attempts = int(state.config.get("max_model_attempts", DEFAULT_MAX_MODEL_ATTEMPTS))
        if state.consecutive_model_failures >= max_attempts:
            return [Emit(ev.SessionFailed(
                reason=f"model failed {state.consecutive_model_failures} times in a row; "
                f"last error: {state.last_model_error}",
                error_kind="model_failed",
            ))]
        retry = state.consecutive_model_failures > 0
        step = state.step if retry else state.step + 1
        if not retry and state.max_steps and step > state.max_steps:
            return [Emit(ev.SessionFailed(
                reason=f"step budget exhausted: {state.max_steps} model steps without a final answer",
                error_kind="max_steps",
            ))]
        attempt = state.attempt + 1 if retry else 1
        request_id = derived_id(state.session_id, "model", str(step), str(attempt))[:16]
        return [Emit(ev.ModelRequested(request_id=request_id, step=step, attempt=attempt, model=state.model))]

    def _act(self, state: SessionState) -> list[Emit]:
        if state.last_reply_calls:
            return [
                Emit(
                    ev.ToolRequested(
                        call_id=call.call_id,
                        name=call.name,
                        arguments_json=json.dumps(call.arguments, sort_keys=True),
                        step=state.step,
                    ),
                    key=call.call_id,
                )
                for call in state.last_reply_calls
            ]
        return [Emit(ev.SessionFinished(
            answer=state.last_reply_text.strip(),
            steps=state.step,
            input_tokens=state.input_tokens,
            output_tokens=state.output_tokens,
        ))]
