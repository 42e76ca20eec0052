"""OpenAI-compatible chat completions (api.openai.com, llama.cpp, vLLM, Ollama, LM Studio, ...)."""
from __future__ import annotations

import json
from typing import Any

import httpx

from loopstream.core.sampling import Sampling

from .actions import (
    action_instructions,
    action_schema,
    parse_action_text,
    render_action,
    render_final,
)
from .base import ActionMode, Message, ModelReply, ToolCall, ToolSpec
from .errors import ProviderConfigError, post_json, unreadable
from .interrupt import interruptible

ACTION_MODES: tuple[str, ...] = ("native", "json_schema", "json_text")
_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")  # api.openai.com models with a fixed temperature


class OpenAICompatProvider:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        action_mode: ActionMode = "native",
        timeout: float = 120.0,
        *,
        sampling: Sampling | None = None,
        extra_body: dict[str, Any] | None = None,
        transport: httpx.BaseTransport | None = None,
        name: str | None = None,
    ) -> None:
        if action_mode not in ACTION_MODES:
            raise ProviderConfigError(f"unknown action mode {action_mode!r}; use one of {', '.join(ACTION_MODES)}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.action_mode: ActionMode = action_mode
        self.sampling = sampling or Sampling()  # for calls that name none (the session's are passed in)
        self.extra_body = extra_body or {}
        if name:
            self.name = name
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = interruptible(httpx.Client(timeout=timeout, headers=headers, transport=transport))
        self._server = f"OpenAI-compatible server at {self.base_url}"

    def close(self) -> None:
        self._client.close()

    def retarget(self, base_url: str, api_key: str | None) -> None:
        """Send the next calls to another server (the shared local model, once found or restarted)."""
        self.base_url = base_url.rstrip("/")
        self._server = f"OpenAI-compatible server at {self.base_url}"
        if api_key:
            self._client.headers["Authorization"] = f"Bearer {api_key}"
        else:
            self._client.headers.pop("Authorization", None)

    def count_tokens(self, messages: list[Message]) -> int:
        """Exact prompt tokens from a llama.cpp server (its chat template, then its tokenizer).
        Other OpenAI-compatible servers have no counting endpoint: the caller estimates."""
        if self.name != "local":
            raise NotImplementedError("this server cannot count tokens")
        root = self.base_url.removesuffix("/v1")
        wire = self.build_request(messages, [])["messages"]
        prompt = post_json(self._client, f"{root}/apply-template", {"messages": wire}, server=self._server)
        tokens = post_json(self._client, f"{root}/tokenize", {"content": prompt.get("prompt", "")},
                           server=self._server)
        return len(tokens.get("tokens", []))

    # ------------------------------------------------------------ request

    def build_request(self, messages: list[Message], tools: list[ToolSpec],
                      sampling: Sampling | None = None) -> dict[str, Any]:
        """The JSON body for /chat/completions (public so tests and traces can inspect it)."""
        body: dict[str, Any] = {"model": self.model}
        if self.action_mode == "native":
            body["messages"] = [_native_message(m) for m in messages]
            if tools:
                body["tools"] = [
                    {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
                    for t in tools
                ]
        else:
            body["messages"] = _json_mode_messages(messages, tools)
            if self.action_mode == "json_schema":
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "action", "schema": action_schema(tools)},
                }
        body.update(self._sampling_body(sampling or self.sampling))
        body.update(self.extra_body)
        return body

    def _sampling_body(self, s: Sampling) -> dict[str, Any]:
        """Every call carries the settings: a server's defaults differ (llama.cpp: temperature
        0.8, no cap). api.openai.com names the cap max_completion_tokens, and its reasoning
        models refuse any temperature or top_p but their default: those two are left out there."""
        official = "api.openai.com" in self.base_url
        out: dict[str, Any] = {"max_completion_tokens" if official else "max_tokens": s.max_output_tokens}
        if not (official and self.model.lower().startswith(_REASONING_PREFIXES)):
            out["temperature"] = s.temperature
            if s.top_p is not None:
                out["top_p"] = s.top_p
        if s.stop:
            out["stop"] = list(s.stop)
        if s.seed is not None:
            out["seed"] = s.seed
        return out

    # ------------------------------------------------------------ call

    def complete(self, messages: list[Message], tools: list[ToolSpec], sampling: Sampling | None = None, *,
                 timeout: float | None = None) -> ModelReply:
        data = post_json(self._client, f"{self.base_url}/chat/completions",
                         self.build_request(messages, tools, sampling), server=self._server, timeout=timeout)
        try:
            choice = data["choices"][0]
            message = choice.get("message") or {}
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise unreadable(json.dumps(data), self._server) from exc
        return self.parse_reply(data, choice, message, tools)

    def parse_reply(
        self, data: dict[str, Any], choice: dict[str, Any], message: dict[str, Any], tools: list[ToolSpec]
    ) -> ModelReply:
        text = message.get("content") or ""
        if isinstance(text, list):  # some servers return content parts
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
        calls: list[ToolCall] = []
        if self.action_mode == "native":
            for i, tc in enumerate(message.get("tool_calls") or []):
                fn = tc.get("function") or {}
                calls.append(
                    ToolCall(call_id=tc.get("id") or f"call_{i}", name=fn.get("name", ""), arguments=_wire_arguments(fn.get("arguments")))
                )
            if not calls and tools and text:
                # Small models behind native endpoints often write the call as JSON text instead.
                found, rest = parse_action_text(text, tools)
                if found:
                    calls, text = found, rest
        else:
            calls, text = parse_action_text(text, tools)
        usage = data.get("usage") or {}
        return ModelReply(
            text=text,
            tool_calls=calls,
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=str(choice.get("finish_reason") or ""),
            mode=self.action_mode,
            model=str(data.get("model") or self.model),
        )


def _wire_arguments(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        # Keep the broken text so the tool processor can show the model what it sent.
        return {"_invalid_json": str(raw)}
    return value if isinstance(value, dict) else {"input": value}


def _native_message(m: Message) -> dict[str, Any]:
    if m.role == "tool":
        return {"role": "tool", "tool_call_id": m.tool_call_id or "", "content": m.content}
    if m.role == "assistant" and m.tool_calls:
        return {
            "role": "assistant",
            "content": m.content or None,
            "tool_calls": [
                {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                for c in m.tool_calls
            ],
        }
    return {"role": m.role, "content": m.content}


def _json_mode_messages(messages: list[Message], tools: list[ToolSpec]) -> list[dict[str, Any]]:
    """History for json modes: instructions in the system message, calls and results as plain text."""
    instructions = action_instructions(tools)
    out: list[dict[str, Any]] = []
    systems = [m.content for m in messages if m.role == "system" and m.content]
    out.append({"role": "system", "content": "\n\n".join([instructions, *systems])})
    names = {c.call_id: c.name for m in messages for c in m.tool_calls}
    for m in messages:
        if m.role == "system":
            continue
        if m.role == "assistant":
            if m.tool_calls:
                content = "\n".join(render_action(c) for c in m.tool_calls)
            else:
                content = render_final(m.content)
            out.append({"role": "assistant", "content": content})
            continue
        if m.role == "tool":
            content = f"Result of tool {m.name or names.get(m.tool_call_id or '', 'unknown')} ({m.tool_call_id or '?'}): {m.content}"
        else:
            content = m.content
        # Merge consecutive user turns: many chat templates require strict alternation.
        if out[-1]["role"] == "user":
            out[-1]["content"] += "\n\n" + content
        else:
            out.append({"role": "user", "content": content})
    return out
