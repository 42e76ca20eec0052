"""Token counting for context budgets.

A provider may count exactly (`count_tokens(messages) -> int`); otherwise we estimate
from characters with the provider family's typical ratio. Estimates only decide *when*
to compact; the tokens a call really used are recorded from the provider's usage.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence

from loopstream.providers.base import Message

CHARS_PER_TOKEN = {"anthropic": 3.5, "openai": 4.0, "local": 3.6, "scripted": 4.0}
PER_MESSAGE_OVERHEAD = 4  # role markers and separators of chat templates


def estimate_tokens(messages: Sequence[Message], family: str = "openai") -> int:
    ratio = CHARS_PER_TOKEN.get(family, 4.0)
    total = 0
    for m in messages:
        chars = len(m.content) + sum(len(c.name) + len(json.dumps(c.arguments)) for c in m.tool_calls)
        total += math.ceil(chars / ratio) + PER_MESSAGE_OVERHEAD
    return total


def count_tokens(provider: object, messages: Sequence[Message]) -> int:
    """Exact when the provider can count, else the estimate for its family."""
    exact = getattr(provider, "count_tokens", None)
    if callable(exact):
        try:
            return int(exact(list(messages)))
        except Exception:  # counting is advisory: fall back rather than fail the step
            pass
    return estimate_tokens(messages, getattr(provider, "name", "openai"))
