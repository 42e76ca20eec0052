"""Anthropic Messages API with native tool_use / tool_result blocks."""
from __future__ import annotations

import json
from typing import Any

import httpx

from loopstream.core.sampling import Sampling

from .base import Message, ModelReply, ToolCall, ToolSpec
from .errors import post_json, unreadable
from .interrupt import interruptible

ANTHROPIC_VERSION = "2023-06-01"


class AnthropicProvider:
    name = "anthropic"

    def __init__(
        self,
        api_key: str,
        model: str,
        base_url: str = "https://api.anthropic.com",
        timeout: float = 120.0,
        *,
        sampling: Sampling | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.sampling = sampling or Sampling()  # for calls that name none (the session's are passed in)
        headers = {"x-api-key": api_key, "anthropic-version": ANTHROPIC_VERSION}
        self._client = interruptible(httpx.Client(timeout=timeout, headers=headers, transport=transport))
        self._server = f"Anthropic API at {self.base_url}"

    def close(self) -> None:
        self._client.close()

    def build_request(self, messages: list[Message], tools: list[ToolSpec],
                      sampling: Sampling | None = None) -> dict[str, Any]:
        """The JSON body for /v1/messages; the sampling settings go with every call (Anthropic
        has no seed: it is not sent)."""
        s = sampling or self.sampling
        body: dict[str, Any] = {"model": self.model, "max_tokens": s.max_output_tokens,
                                "temperature": s.temperature, "messages": _wire_messages(messages)}
        if s.top_p is not None:
            body["top_p"] = s.top_p
        if s.stop:
            body["stop_sequences"] = list(s.stop)
        system = "\n\n".join(m.content for m in messages if m.role == "system" and m.content)
        if system:
            body["system"] = system
        if tools:
            body["tools"] = [{"name": t.name, "description": t.description, "input_schema": t.parameters} for t in tools]
        return body

    def count_tokens(self, messages: list[Message], tools: list[ToolSpec] | None = None) -> int:
        """Exact input tokens from Anthropic's token-counting endpoint (no generation)."""
        body = self.build_request(messages, tools or [])
        for key in ("max_tokens", "temperature", "top_p", "stop_sequences"):
            body.pop(key, None)
        data = post_json(self._client, f"{self.base_url}/v1/messages/count_tokens", body, server=self._server)
        return int(data["input_tokens"])

    def complete(self, messages: list[Message], tools: list[ToolSpec], sampling: Sampling | None = None, *,
                 timeout: float | None = None) -> ModelReply:
        data = post_json(self._client, f"{self.base_url}/v1/messages", self.build_request(messages, tools, sampling),
                         server=self._server, timeout=timeout)
        blocks = data.get("content")
        if not isinstance(blocks, list):
            raise unreadable(json.dumps(data), self._server)
        return parse_reply(data, blocks, self.model)


def parse_reply(data: dict[str, Any], blocks: list[dict[str, Any]], model: str) -> ModelReply:
    texts = [b.get("text", "") for b in blocks if b.get("type") == "text"]
    calls = [
        ToolCall(call_id=b["id"], name=b["name"], arguments=b.get("input") or {})
        for b in blocks
        if b.get("type") == "tool_use"
    ]
    usage = data.get("usage") or {}
    # Cached prompt tokens are reported separately; all of them were read as input.
    input_tokens = sum(int(usage.get(k) or 0) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
    return ModelReply(
        text="".join(texts),
        tool_calls=calls,
        input_tokens=input_tokens,
        output_tokens=int(usage.get("output_tokens") or 0),
        finish_reason=str(data.get("stop_reason") or ""),
        mode="native",
        model=str(data.get("model") or model),
    )


def _wire_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Normalized turns → alternating user/assistant turns of content blocks."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "system":
            continue
        blocks: list[dict[str, Any]]
        if m.role == "tool":
            role = "user"
            blocks = [{"type": "tool_result", "tool_use_id": m.tool_call_id or "", "content": m.content}]
        else:
            role = m.role
            # The API rejects empty text blocks.
            blocks = [{"type": "text", "text": m.content}] if m.content else []
            blocks += [{"type": "tool_use", "id": c.call_id, "name": c.name, "input": c.arguments} for c in m.tool_calls]
        if not blocks:
            continue
        # Results of parallel calls must share one user turn, so merge same-role neighbours.
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return out
