"""The size of a session's context, as the context budget measures it: a pure function of
the folded state, so the orchestrator decides from it without I/O and a replay decides the same.

Estimator 2 (`compaction.estimator`, the default) measures the next request as the adapter
will send it — the messages written in the session's action mode, plus the tool specs and
action instructions the model processor estimated with its last reply — and corrects it by
the ratio of the prompt tokens the provider reported for that reply to what the model
processor estimated it sent (`calibration`). Estimator 1 (sessions recorded before it) counts
the characters of the messages only. docs/architecture.md, "Context budget and compaction".
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from loopstream.core.conversation import Message
from loopstream.core.state import SessionState, summary_message
from loopstream.providers.tokens import (
    UNCOUNTED_FAMILIES,
    estimate_tokens_v1,
    message_tokens,
    messages_tokens,
)

# A reported count this far from the estimate is not believed further (a server that
# reports nothing useful, or a bad estimate of an exotic tokenizer): the correction is capped.
MIN_RATIO, MAX_RATIO = 0.2, 5.0


def calibration(state: SessionState) -> float:
    """Real prompt tokens over estimated, for the last reply that measured both (1.0 before
    any, for estimator 1, and for families whose counts are not real)."""
    if (state.policy.compaction.estimator == 1 or state.provider in UNCOUNTED_FAMILIES
            or state.last_input_estimate <= 0 or state.last_input_tokens <= 0):
        return 1.0
    return min(MAX_RATIO, max(MIN_RATIO, state.last_input_tokens / state.last_input_estimate))


def context_tokens(state: SessionState, messages: Sequence[Message] | None = None) -> int:
    """Estimated prompt tokens of the next request with `messages` (default: the state's)."""
    messages = state.messages if messages is None else messages
    if state.policy.compaction.estimator == 1:
        return estimate_tokens_v1(messages, state.provider)
    raw = messages_tokens(messages, state.provider, state.action_mode) + state.tool_tokens
    return math.ceil(raw * calibration(state))


def _tokens(state: SessionState, messages: Sequence[Message]) -> int:
    """Calibrated tokens of some messages alone (no tool specs)."""
    json_mode = state.action_mode in ("json_schema", "json_text")
    raw = sum(message_tokens(m, state.provider, json_mode) for m in messages)
    return math.ceil(raw * calibration(state))


def fixed_count(messages: Sequence[Message]) -> int:
    """How many leading messages no compaction touches: the system prompt and the goal."""
    return min(len(messages), 2 if messages and messages[0].role == "system" else 1)


@dataclass(frozen=True)
class Space:
    """Where a context's tokens go (calibrated estimates)."""

    system: int
    goal: int
    tools: int
    rest: int  # everything compaction may summarize or keeps as recent turns

    @property
    def fixed(self) -> int:
        """What every request carries whatever is compacted."""
        return self.system + self.goal + self.tools

    def describe(self) -> str:
        return (f"system prompt ~{self.system}, goal ~{self.goal}, tool specs and action instructions "
                f"~{self.tools}, the other turns ~{self.rest} tokens")


def space(state: SessionState) -> Space:
    """`state`'s context split into what no compaction removes and the rest."""
    msgs, n = state.messages, fixed_count(state.messages)
    system = _tokens(state, msgs[:1]) if n == 2 else 0
    goal = _tokens(state, msgs[n - 1:n]) if n else 0
    return Space(system, goal, math.ceil(state.tool_tokens * calibration(state)), _tokens(state, msgs[n:]))


def grew_since_compaction(state: SessionState) -> bool:
    """Whether a message came after the last compaction (or there was none): a context is
    compacted again only once it has new content."""
    last = state.last_compaction_seq
    return last is None or any(m.seq is not None and m.seq > last for m in reversed(state.messages))


def worth_compacting(state: SessionState, span: Sequence[Message]) -> bool:
    """Whether summarizing `span` saves at least a quarter of it: its summary message (a
    header, and at most half of the span's text) must be clearly smaller than the span."""
    if not span or span[0].seq is None or span[-1].seq is None:
        return False
    header = message_tokens(summary_message("", span[0].seq, span[-1].seq), state.provider)
    raw = sum(message_tokens(m, state.provider) for m in span)
    return raw >= 4 * header
