"""Checks on a final answer that small models get wrong (policy `answers`).

A pure check on the folded state when the model answers without tool calls (the orchestrator
asks before it finishes the session). Two rules:

- echoed_error: the answer repeats the error the last tool call returned (one a call made
  differently could fix: not a denial), instead of recovering from it or answering the goal;
- named_tool: the goal asks for one of the session's tools ("use the add tool") and the model
  answers before calling any tool (from memory: a small model's arithmetic is often wrong).

A refused answer is a GuardrailTripped (stage output, action tell_model) whose message the
fold gives the model; after `answers.nudges` refusals in all, answers are accepted as they are.
"""
from __future__ import annotations

import re

from loopstream.core import events as ev
from loopstream.core.processor import Emit
from loopstream.core.state import ERROR_RESULT_PREFIX, SessionState

QUOTE_CHARS = 300  # of the error quoted back to the model
# Errors the model can fix by calling again differently. A denial (permission, a person, scope,
# a guardrail) or a refused delegation is an answer it may well report as it is.
FIXABLE = frozenset({"invalid_arguments", "unknown_tool", "not_found", "no_match", "tool_exception",
                     "tool_error", "timeout", "transient", "mcp_tool_error"})
MIN_ECHO_CHARS = 12  # shorter errors ("not found") are too common to call an answer an echo


def check(state: SessionState, answer: str) -> list[Emit] | None:
    """A GuardrailTripped refusing `answer`, or None (the answer stands)."""
    policy = state.policy.answers
    if not policy.enabled or state.answer_nudges >= policy.nudges:
        return None
    if policy.echoed_error and (error := last_tool_error(state)) and echoes(answer, error):
        quoted = error[:QUOTE_CHARS]
        return [Emit(ev.GuardrailTripped(stage="output", rule="echoed_error", action="tell_model", message=(
            f"Your answer repeats the error of your last tool call ({quoted}). That is not an answer "
            "to the goal. Fix the call (check the tool's name and arguments) and call it again, or "
            "try another way; then answer the goal.")))]
    if policy.named_tool and state.tool_calls == 0 and (tool := named_tool(state.goal, state.tools)):
        return [Emit(ev.GuardrailTripped(stage="output", rule="named_tool", action="tell_model", message=(
            f"The goal asks you to use the {tool} tool, and you have not called any tool yet. "
            f"Call {tool} now instead of answering from memory.")))]
    return None


def last_tool_error(state: SessionState) -> str | None:
    """The error text of the last tool result, if the last tool call failed in a way a call made
    differently could fix (`FIXABLE`)."""
    for message in reversed(state.messages):
        if message.role == "tool":
            content = message.content
            if not content.startswith(ERROR_RESULT_PREFIX):
                return None
            kind, _, text = content[len(ERROR_RESULT_PREFIX):].partition("): ")
            return text if kind in FIXABLE else None
        if message.role == "user":
            return None  # a person or the harness spoke since: not answering the tool
    return None


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def echoes(answer: str, error: str) -> bool:
    """The answer is (a part of) the error, or quotes the error's opening."""
    a, e = _norm(answer), _norm(error)
    if len(e) < MIN_ECHO_CHARS or not a:
        return False
    return (len(a) >= MIN_ECHO_CHARS and a in e) or e[:60] in a


def named_tool(goal: str, tools: list[str]) -> str | None:
    """The first of `tools` the goal asks for by name: "use the add tool", "using grep", "with
    read_file", "call add" (`read file` for `read_file` too). A tool's name used as an ordinary
    word ("add things") is not asking for it."""
    text = " ".join(goal.casefold().split())
    for tool in tools:
        for spelt in dict.fromkeys((tool.casefold(), tool.casefold().replace("_", " "))):
            if re.search(rf"\b(?:use|using|call|with)\s+(?:the\s+)?{re.escape(spelt)}(?![\w-])", text):
                return tool
    return None
