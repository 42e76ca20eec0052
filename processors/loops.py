"""Loop detection: a model that repeats itself is told, then stopped (policy `loops`).

A pure check on the folded state when the model has answered with tool calls (the
orchestrator asks before it requests them). Three kinds, over the last `loops.window`
replies the fold keeps (`SessionState.recent_replies`, `recent_calls`):

- repeated_call: a call with the same tool and arguments as `max_identical_calls` earlier ones;
- repeated_reply: the reply (text and calls) is the same as the `max_identical_replies` before it;
- oscillation: the replies alternate between two, A B A B.

The first `loops.nudges` detections answer each call of the reply with a note quoting the
earlier result (the calls do not run); the next one ends the session (error kind `loop`).
"""
from __future__ import annotations

import json

from loopstream.core import events as ev
from loopstream.core.conversation import ToolCall
from loopstream.core.processor import Emit
from loopstream.core.state import SessionState, call_signature

QUOTE_CHARS = 1500  # of an earlier result quoted back to the model
DETAIL_CHARS = 300


def check(state: SessionState) -> list[Emit] | None:
    """What to do about the last reply, if it repeats itself: a LoopDetected that tells the
    model, or one that stops followed by SessionFailed. None: no loop (or detection is off)."""
    policy = state.policy.loops
    calls = state.last_reply_calls
    if not policy.enabled or not calls or not state.recent_replies:
        return None
    found = _repeated_call(state, calls) or _repeated_reply(state) or _oscillation(state, calls)
    if found is None:
        return None
    kind, detail, note = found
    call_ids = [c.call_id for c in calls]
    if state.loop_nudges >= policy.nudges:
        why = f"the model kept repeating itself ({kind}: {detail})"
        if policy.nudges:
            why += f" after being told {state.loop_nudges} time(s)"
        return [Emit(ev.LoopDetected(kind=kind, action="stop", message=note, call_ids=call_ids, detail=detail)),
                Emit(ev.SessionFailed(reason=why, error_kind="loop"))]
    return [Emit(ev.LoopDetected(kind=kind, action="tell_model", message=note, call_ids=call_ids, detail=detail))]


def _earlier(state: SessionState) -> list[tuple[str, str]]:
    """(signature, call id) of the calls made before the current reply, within the window."""
    current_seq = state.recent_replies[-1][0]
    return [(sig, call_id) for seq, sig, call_id in state.recent_calls if seq != current_seq]


def _repeated_call(state: SessionState, calls: list[ToolCall]) -> tuple[str, str, str] | None:
    earlier = _earlier(state)
    limit = state.policy.loops.max_identical_calls
    for call in calls:
        sig = call_signature(call)
        same = [call_id for s, call_id in earlier if s == sig]
        if len(same) >= limit:
            shown = _call_text(call)
            result = _result_of(state, same[-1])
            note = (f"Loop detected: you already called {shown} {len(same)} times with these exact arguments, "
                    f"so it was not run again (nor any other call of this reply). Its result was:\n{result}\n"
                    "Do not call it again. Use that result to give the final answer now, or try a different approach.")
            return "repeated_call", _clip(f"{shown} made {len(same) + 1} times"), note
    return None


def _repeated_reply(state: SessionState) -> tuple[str, str, str] | None:
    limit = state.policy.loops.max_identical_replies
    *before, current = [sig for _, sig in state.recent_replies]
    if len(before) < limit or any(sig != current for sig in before[-limit:]):
        return None
    note = (f"Loop detected: this reply is the same as your previous {limit}; its calls were not run. "
            "Give the final answer now, or try a different approach.")
    return "repeated_reply", _clip(f"the same reply {limit + 1} times in a row"), note


def _oscillation(state: SessionState, calls: list[ToolCall]) -> tuple[str, str, str] | None:
    if not state.policy.loops.oscillation or len(state.recent_replies) < 4:
        return None
    a, b, a2, b2 = (sig for _, sig in state.recent_replies[-4:])
    if a != a2 or b != b2 or a == b:
        return None
    earlier = _earlier(state)
    results = [f"- {_clip(sig.replace(chr(0), ' '), 120)}: {_result_of(state, call_id, 600)}"
               for sig, call_id in earlier[-2:]]
    note = ("Loop detected: your replies alternate between the same two steps without progress; "
            "this reply's calls were not run. The latest results were:\n" + "\n".join(results) +
            "\nGive the final answer now, or try something different.")
    return "oscillation", _clip(f"alternating between two replies, ending with {_call_text(calls[0])}"), note


def _result_of(state: SessionState, call_id: str, limit: int = QUOTE_CHARS) -> str:
    """The text the call's result put in the context (newest first: a recent call is near the end)."""
    for message in reversed(state.messages):
        if message.role == "tool" and message.tool_call_id == call_id:
            text = message.content
            return text if len(text) <= limit else text[:limit] + f"… [{len(text) - limit} more characters]"
    return "(no longer in the context)"


def _call_text(call: ToolCall) -> str:
    return _clip(f"{call.name}({json.dumps(call.arguments, sort_keys=True, ensure_ascii=False)})", 200)


def _clip(text: str, limit: int = DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
