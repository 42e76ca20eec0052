"""Shaping: what the model is sent, made to fit a small context (policy `shaping`).

A pure function of the folded state, applied by the model processor to the conversation it
sends; the log keeps every message whole, so replay, fork and `show` see what happened.

- A tool result identical to a later one (the same file read twice) is sent once, at its
  latest place; the earlier copies become a one-line reference.
- A tool result longer than `max_result_chars` is sent as its head and tail with a note of
  what was left out (read_file takes offset/limit to read more).
- On the last step the step budget allows, the model is told to give its final answer now.
"""
from __future__ import annotations

from loopstream.core.conversation import Message
from loopstream.core.state import LONG_RESULT_CHARS, SessionState


def shaped(state: SessionState) -> list[Message]:
    """The messages to send for the next request (the state's own, when shaping is off)."""
    policy = state.policy.shaping
    if not policy.enabled:
        return state.messages
    messages = state.messages
    if state.long_results:  # else nothing long in the context: nothing to shape but the last step
        if policy.dedupe_results:
            messages = _deduplicated(messages)
        if policy.max_result_chars:
            messages = [_windowed(m, policy.max_result_chars) if m.role == "tool" else m for m in messages]
    if policy.final_answer_nudge and state.max_steps and state.step >= state.max_steps:
        messages = [*messages, Message(role="user", content=LAST_STEP)]
    return messages


LAST_STEP = ("This is your last step: the step budget is used up after this reply. Do not call a tool; "
             "give your final answer now from what you have.")
MIN_DEDUPE_CHARS = LONG_RESULT_CHARS  # shorter results cost less than the reference that would replace them


def _deduplicated(messages: list[Message]) -> list[Message]:
    latest: dict[str, int] = {}
    for i, m in enumerate(messages):
        if m.role == "tool" and len(m.content) >= MIN_DEDUPE_CHARS:
            latest[m.content] = i
    if len(latest) == sum(1 for m in messages if m.role == "tool" and len(m.content) >= MIN_DEDUPE_CHARS):
        return messages  # no duplicates: the list as it is
    out = []
    for i, m in enumerate(messages):
        if m.role == "tool" and latest.get(m.content, i) != i:
            m = m.model_copy(update={"content": f"[the same {len(m.content)} characters as the later result of "
                                                f"{messages[latest[m.content]].name or 'a tool'}, sent there]"})
        out.append(m)
    return out


def _windowed(message: Message, limit: int) -> Message:
    text = message.content
    if len(text) <= limit:
        return message
    head, tail = text[: limit * 3 // 4], text[-(limit // 4):]
    left_out = len(text) - len(head) - len(tail)
    note = (f"\n[… {left_out} characters left out here (characters {len(head)}–{len(text) - len(tail)}); "
            "read_file takes offset and limit to read them …]\n")
    return message.model_copy(update={"content": head + note + tail})
