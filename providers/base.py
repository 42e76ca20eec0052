"""The one normalized interface every model provider implements.

The model processor speaks only these types; each provider module translates them
to and from one wire format (OpenAI-compatible chat completions, Anthropic Messages).
"""
from __future__ import annotations

from typing import Literal, Protocol

from pydantic import BaseModel, Field

from loopstream.core.conversation import Message, ToolCall, ToolSpec
from loopstream.core.sampling import Sampling

__all__ = ["ActionMode", "Message", "ModelReply", "Provider", "ProviderError", "Sampling", "ToolCall", "ToolSpec"]


ActionMode = Literal["native", "json_schema", "json_text"]


class ModelReply(BaseModel):
    """What a provider returns. No tool calls means `text` is the final answer."""

    text: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = ""
    mode: ActionMode = "native"
    model: str = ""


class ProviderError(Exception):
    """A failed model call. `retryable` says whether trying again may help."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        status: int | None = None,
        retry_after: float | None = None,
        kind: str = "provider_error",
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.kind = kind


class Provider(Protocol):
    """A model. `complete` stops as soon as the current cancel token (core/cancel.py) is
    cancelled, raising Interrupted: an adapter does its I/O through `providers/interrupt.py`
    (HTTP) or `cancel.sleep` / `cancel.run_in_thread`."""

    name: str  # "openai", "anthropic", "local", "scripted"
    model: str

    def complete(self, messages: list[Message], tools: list[ToolSpec], sampling: Sampling | None = None, *,
                 timeout: float | None = None) -> ModelReply:
        """One model call. `sampling` (the session's settings; None: the safe defaults) is
        sent with every call: temperature, output cap, stop sequences, top_p and seed where set.
        `timeout`: seconds this call may take (the session's remaining time budget), over the
        client's own; past it the call is abandoned (the connection closed, so a server stops
        generating) and raises ProviderError kind "timeout"."""
        ...
