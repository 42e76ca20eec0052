"""Request/response mapping of the OpenAI-compatible and Anthropic providers, error mapping, factory."""
from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from loopstream.core.sampling import Sampling
from loopstream.providers import (
    Message,
    ProviderConfigError,
    ProviderError,
    ToolCall,
    ToolSpec,
    make_provider,
    open_provider,
)
from loopstream.providers.anthropic import AnthropicProvider
from loopstream.providers.openai_compat import OpenAICompatProvider

ADD = ToolSpec(
    name="add",
    description="Add two integers.",
    parameters={"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]},
)
CONVERSATION = [
    Message(role="system", content="Be brief."),
    Message(role="user", content="What is 40213 + 1999?"),
    Message(role="assistant", content="", tool_calls=[ToolCall(call_id="call_1", name="add", arguments={"a": 40213, "b": 1999})]),
    Message(role="tool", content="42212", tool_call_id="call_1", name="add"),
]


class Recorder:
    """An httpx.MockTransport that records requests and answers with a canned response."""

    def __init__(self, respond: Callable[[httpx.Request], httpx.Response]) -> None:
        self.requests: list[httpx.Request] = []
        self._respond = respond
        self.transport = httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self._respond(request)

    @property
    def body(self) -> dict[str, Any]:
        return json.loads(self.requests[-1].content)


def ok(payload: dict[str, Any]) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(200, json=payload)


def openai_reply(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {
        "model": "gpt-test",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7},
    }


def openai(rec: Recorder, mode: str = "native", key: str | None = "sk-test") -> OpenAICompatProvider:
    return OpenAICompatProvider("http://llm.test/v1/", key, "m", mode, 5.0, transport=rec.transport)  # type: ignore[arg-type]


# ---------------------------------------------------------------- OpenAI-compatible, native


def test_openai_native_request_mapping() -> None:
    rec = Recorder(ok(openai_reply({"content": "42212"})))
    openai(rec).complete(CONVERSATION, [ADD])
    req = rec.requests[0]
    assert str(req.url) == "http://llm.test/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-test"
    body = rec.body
    assert body["model"] == "m"
    assert body["tools"] == [{"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": ADD.parameters}}]
    assert "response_format" not in body
    msgs = body["messages"]
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert msgs[2]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 40213, "b": 1999}'}}
    ]
    assert msgs[2]["content"] is None
    assert msgs[3] == {"role": "tool", "tool_call_id": "call_1", "content": "42212"}


def test_openai_native_tool_calls_and_usage() -> None:
    reply = openai_reply(
        {"content": None, "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        finish="tool_calls",
    )
    rec = Recorder(ok(reply))
    out = openai(rec).complete(CONVERSATION[:2], [ADD])
    assert out.tool_calls == [ToolCall(call_id="call_9", name="add", arguments={"a": 1, "b": 2})]
    assert (out.text, out.input_tokens, out.output_tokens, out.finish_reason, out.model, out.mode) == (
        "", 11, 7, "tool_calls", "gpt-test", "native"
    )


def test_openai_native_falls_back_to_json_in_text() -> None:
    rec = Recorder(ok(openai_reply({"content": '```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```'})))
    out = openai(rec).complete(CONVERSATION[:2], [ADD])
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("add", {"a": 1, "b": 2})]
    assert out.text == ""


def test_openai_native_text_without_tools_is_left_alone() -> None:
    text = '{"name": "add", "arguments": {"a": 1}}'
    rec = Recorder(ok(openai_reply({"content": text})))
    out = openai(rec).complete(CONVERSATION[:2], [])
    assert out.tool_calls == [] and out.text == text
    assert "tools" not in rec.body


def test_openai_native_invalid_arguments_are_kept_for_the_tool_processor() -> None:
    bad = {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{a: 1,"}}
    rec = Recorder(ok(openai_reply({"content": None, "tool_calls": [bad]})))
    out = openai(rec).complete(CONVERSATION[:2], [ADD])
    assert out.tool_calls[0].arguments == {"_invalid_json": "{a: 1,"}


def test_openai_no_key_sends_no_authorization() -> None:
    rec = Recorder(ok(openai_reply({"content": "hi"})))
    openai(rec, key=None).complete(CONVERSATION[:2], [])
    assert "authorization" not in rec.requests[0].headers


# ---------------------------------------------------------------- OpenAI-compatible, json modes


def test_openai_json_schema_request_mapping() -> None:
    rec = Recorder(ok(openai_reply({"content": '{"action": "final_answer", "answer": "42212"}'})))
    convo = [*CONVERSATION, Message(role="user", content="Thanks. Double-check it.")]
    out = openai(rec, "json_schema").complete(convo, [ADD])
    body = rec.body
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["name"] == "action"
    assert "anyOf" in body["response_format"]["json_schema"]["schema"]
    assert "tools" not in body
    msgs = body["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("Respond with exactly one JSON object")
    assert msgs[0]["content"].endswith("Be brief.")
    assert json.loads(msgs[2]["content"]) == {"action": "call_tool", "tool": "add", "arguments": {"a": 40213, "b": 1999}}
    # the tool result and the following user turn merge: strict alternation for chat templates
    assert msgs[3]["content"] == "Result of tool add (call_1): 42212\n\nThanks. Double-check it."
    assert (out.text, out.tool_calls, out.mode) == ("42212", [], "json_schema")


def test_openai_json_modes_render_past_answers_and_unnamed_results() -> None:
    convo = [
        Message(role="user", content="hi"),
        Message(role="assistant", content="Hello!"),
        Message(role="user", content="add 1 and 2"),
        Message(role="assistant", tool_calls=[ToolCall(call_id="x7", name="add", arguments={"a": 1, "b": 2})]),
        Message(role="tool", content="3", tool_call_id="x7"),
    ]
    rec = Recorder(ok(openai_reply({"content": "Sum: 3"})))
    out = openai(rec, "json_text").complete(convo, [ADD])
    msgs = rec.body["messages"]
    assert "response_format" not in rec.body
    assert json.loads(msgs[2]["content"]) == {"action": "final_answer", "answer": "Hello!"}
    assert msgs[-1]["content"] == "Result of tool add (x7): 3"
    assert out.text == "Sum: 3"


def test_openai_json_text_lenient_call() -> None:
    rec = Recorder(ok(openai_reply({"content": 'Calling the tool.\n{"action": "call_tool", "tool": "add", "arguments": {"a": 5, "b": 6}}'})))
    out = openai(rec, "json_text").complete(CONVERSATION[:2], [ADD])
    assert [(c.call_id, c.name, c.arguments) for c in out.tool_calls] == [("call_0", "add", {"a": 5, "b": 6})]
    assert out.text == "Calling the tool."


def test_openai_options_in_body() -> None:
    rec = Recorder(ok(openai_reply({"content": "x"})))
    p = OpenAICompatProvider("http://llm.test/v1", None, "m", "json_text", sampling=Sampling(max_output_tokens=64),
                             extra_body={"logit_bias": {"1": -5}}, transport=rec.transport)
    p.complete(CONVERSATION[:2], [])
    assert (rec.body["temperature"], rec.body["max_tokens"], rec.body["logit_bias"]) == (0.0, 64, {"1": -5})


def test_every_openai_compatible_call_carries_the_safe_defaults() -> None:
    rec = Recorder(ok(openai_reply({"content": "x"})))
    openai(rec).complete(CONVERSATION[:2], [ADD])  # no settings named anywhere
    body = rec.body
    assert (body["temperature"], body["max_tokens"]) == (0.0, 1024)
    assert not {"stop", "top_p", "seed"} & set(body)  # unset: nothing to send


def test_the_calls_settings_win_over_the_providers_and_all_of_them_are_sent() -> None:
    rec = Recorder(ok(openai_reply({"content": "x"})))
    p = OpenAICompatProvider("http://llm.test/v1", None, "m", "native", sampling=Sampling(temperature=1.5),
                             transport=rec.transport)
    p.complete(CONVERSATION[:2], [], Sampling(temperature=0.3, max_output_tokens=77, stop=["###", "END"], top_p=0.9,
                                              seed=7))
    body = rec.body
    assert (body["temperature"], body["max_tokens"], body["stop"], body["top_p"], body["seed"]) == (
        0.3, 77, ["###", "END"], 0.9, 7)


@pytest.mark.parametrize(("model", "temperature_sent"), [("gpt-4o-mini", True), ("o3-mini", False), ("gpt-5", False)])
def test_api_openai_com_gets_max_completion_tokens_and_reasoning_models_no_temperature(
        model: str, temperature_sent: bool) -> None:
    rec = Recorder(ok(openai_reply({"content": "x"})))
    p = OpenAICompatProvider("https://api.openai.com/v1", "k", model, "native", transport=rec.transport)
    p.complete(CONVERSATION[:2], [], Sampling(temperature=0.0, max_output_tokens=300, top_p=0.5))
    body = rec.body
    assert body["max_completion_tokens"] == 300 and "max_tokens" not in body
    assert ("temperature" in body, "top_p" in body) == (temperature_sent, temperature_sent)


def test_anthropic_sends_every_setting_but_seed() -> None:
    rec = Recorder(ok(ANTHROPIC_REPLY))
    anthropic(rec).complete(CONVERSATION[:2], [], Sampling(temperature=0.2, max_output_tokens=99, stop=["\n\nHuman:"],
                                                           top_p=0.8, seed=3))
    body = rec.body
    assert (body["temperature"], body["max_tokens"], body["stop_sequences"], body["top_p"]) == (
        0.2, 99, ["\n\nHuman:"], 0.8)
    assert "seed" not in body and "stop" not in body


def test_openai_rejects_unknown_mode() -> None:
    with pytest.raises(ProviderConfigError):
        OpenAICompatProvider("http://x", None, "m", "xml")  # type: ignore[arg-type]


# ---------------------------------------------------------------- error mapping


def status(code: int, headers: dict[str, str] | None = None, body: Any = None) -> Callable[[httpx.Request], httpx.Response]:
    payload = body if body is not None else {"error": {"message": f"boom {code}", "type": "x"}}
    return lambda request: httpx.Response(code, json=payload, headers=headers or {})


@pytest.mark.parametrize(
    ("code", "retryable", "kind", "fragment"),
    [
        (400, False, "bad_request", "rejected the request (400): boom 400"),
        (401, False, "auth", "OpenAI-compatible server at http://llm.test/v1 rejected the API key (401)"),
        (403, False, "permission", "denied access (403)"),
        (404, False, "not_found", "404 (unknown model or wrong base URL)"),
        (429, True, "rate_limit", "rate limiting (429)"),
        (500, True, "server_error", "HTTP 500"),
        (502, True, "server_error", "HTTP 502"),
        (503, True, "server_error", "HTTP 503"),
        (504, True, "server_error", "HTTP 504"),
    ],
)
def test_openai_http_errors(code: int, retryable: bool, kind: str, fragment: str) -> None:
    rec = Recorder(status(code))
    with pytest.raises(ProviderError) as info:
        openai(rec).complete(CONVERSATION[:2], [])
    err = info.value
    assert (err.status, err.retryable, err.kind) == (code, retryable, kind)
    assert fragment in str(err)


def test_retry_after_seconds_ms_and_date() -> None:
    for headers, expected in [({"Retry-After": "7"}, 7.0), ({"retry-after-ms": "1500"}, 1.5), ({}, None)]:
        with pytest.raises(ProviderError) as info:
            openai(Recorder(status(429, headers))).complete(CONVERSATION[:2], [])
        assert info.value.retry_after == expected
    with pytest.raises(ProviderError) as info:
        openai(Recorder(status(503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}))).complete(CONVERSATION[:2], [])
    assert info.value.retry_after == 0.0  # a date in the past: retry now


def test_non_json_error_body() -> None:
    rec = Recorder(lambda r: httpx.Response(502, text="<html>Bad Gateway</html>"))
    with pytest.raises(ProviderError) as info:
        openai(rec).complete(CONVERSATION[:2], [])
    assert info.value.retryable and "Bad Gateway" in str(info.value)


@pytest.mark.parametrize(
    ("exc", "kind"), [(httpx.ConnectError("refused"), "connection"), (httpx.ReadTimeout("slow"), "timeout")]
)
def test_transport_errors_are_retryable(exc: Exception, kind: str) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(ProviderError) as info:
        openai(Recorder(fail)).complete(CONVERSATION[:2], [])
    assert info.value.retryable and info.value.kind == kind and info.value.status is None


def test_unreadable_success_body() -> None:
    rec = Recorder(lambda r: httpx.Response(200, text="not json"))
    with pytest.raises(ProviderError) as info:
        openai(rec).complete(CONVERSATION[:2], [])
    assert info.value.kind == "bad_response" and info.value.retryable


# ---------------------------------------------------------------- Anthropic


def anthropic(rec: Recorder) -> AnthropicProvider:
    return AnthropicProvider("ak-test", "claude-test", "http://anthropic.test/", 5.0, transport=rec.transport)


ANTHROPIC_REPLY = {
    "id": "msg_1",
    "model": "claude-test-2025",
    "stop_reason": "tool_use",
    "content": [
        {"type": "text", "text": "Let me add."},
        {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 1, "b": 2}},
        {"type": "tool_use", "id": "toolu_2", "name": "add", "input": {"a": 3, "b": 4}},
    ],
    "usage": {"input_tokens": 20, "output_tokens": 9, "cache_read_input_tokens": 100},
}


def test_anthropic_request_mapping() -> None:
    rec = Recorder(ok(ANTHROPIC_REPLY))
    convo = [
        *CONVERSATION[:2],
        Message(role="assistant", content="Adding.", tool_calls=[
            ToolCall(call_id="t1", name="add", arguments={"a": 1, "b": 2}),
            ToolCall(call_id="t2", name="add", arguments={"a": 3, "b": 4}),
        ]),
        Message(role="tool", content="3", tool_call_id="t1", name="add"),
        Message(role="tool", content="7", tool_call_id="t2", name="add"),
    ]
    anthropic(rec).complete(convo, [ADD])
    req = rec.requests[0]
    assert str(req.url) == "http://anthropic.test/v1/messages"
    assert req.headers["x-api-key"] == "ak-test"
    assert req.headers["anthropic-version"] == "2023-06-01"
    body = rec.body
    assert body["system"] == "Be brief."
    assert body["model"] == "claude-test" and body["max_tokens"] == 1024 and body["temperature"] == 0.0
    assert body["tools"] == [{"name": "add", "description": "Add two integers.", "input_schema": ADD.parameters}]
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "What is 40213 + 1999?"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Adding."},
            {"type": "tool_use", "id": "t1", "name": "add", "input": {"a": 1, "b": 2}},
            {"type": "tool_use", "id": "t2", "name": "add", "input": {"a": 3, "b": 4}},
        ]},
        {"role": "user", "content": [  # both results in one turn
            {"type": "tool_result", "tool_use_id": "t1", "content": "3"},
            {"type": "tool_result", "tool_use_id": "t2", "content": "7"},
        ]},
    ]


def test_anthropic_skips_empty_text_blocks() -> None:
    rec = Recorder(ok(ANTHROPIC_REPLY))
    anthropic(rec).complete(CONVERSATION, [ADD])
    assistant = rec.body["messages"][1]
    assert assistant["content"] == [{"type": "tool_use", "id": "call_1", "name": "add", "input": {"a": 40213, "b": 1999}}]
    assert "system" in rec.body


def test_anthropic_response_mapping() -> None:
    out = anthropic(Recorder(ok(ANTHROPIC_REPLY))).complete(CONVERSATION[:2], [ADD])
    assert out.text == "Let me add."
    assert [(c.call_id, c.arguments) for c in out.tool_calls] == [("toolu_1", {"a": 1, "b": 2}), ("toolu_2", {"a": 3, "b": 4})]
    assert (out.input_tokens, out.output_tokens, out.finish_reason, out.model) == (120, 9, "tool_use", "claude-test-2025")


@pytest.mark.parametrize(
    ("code", "retryable", "kind"),
    [(401, False, "auth"), (400, False, "bad_request"), (429, True, "rate_limit"), (529, True, "overloaded"), (500, True, "server_error")],
)
def test_anthropic_errors(code: int, retryable: bool, kind: str) -> None:
    body = {"type": "error", "error": {"type": "overloaded_error" if code == 529 else "x", "message": "nope"}}
    with pytest.raises(ProviderError) as info:
        anthropic(Recorder(status(code, {"retry-after": "3"}, body))).complete(CONVERSATION[:2], [])
    err = info.value
    assert (err.retryable, err.kind, err.status) == (retryable, kind, code)
    assert "Anthropic API at http://anthropic.test" in str(err) and "nope" in str(err)
    if retryable:
        assert err.retry_after == 3.0


# ---------------------------------------------------------------- factory


def test_factory_anthropic_from_key() -> None:
    p, ctx = make_provider(env={"ANTHROPIC_API_KEY": "k"})
    assert isinstance(p, AnthropicProvider) and ctx is None and p.model.startswith("claude")


def test_factory_claude_model_wins_over_openai_env() -> None:
    p, _ = make_provider("claude-x", env={"ANTHROPIC_API_KEY": "k", "OPENAI_API_KEY": "o"})
    assert isinstance(p, AnthropicProvider) and p.model == "claude-x"


def test_factory_openai_official_is_native_even_with_env_mode() -> None:
    p, ctx = make_provider(env={"OPENAI_API_KEY": "o", "LOOPSTREAM_ACTION_MODE": "json_text", "LOOPSTREAM_MODEL": "gpt-4o"})
    assert isinstance(p, OpenAICompatProvider) and ctx is None
    assert (p.base_url, p.action_mode, p.model) == ("https://api.openai.com/v1", "native", "gpt-4o")


def test_factory_openai_compatible_server_uses_env_mode() -> None:
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:8080/v1", "LOOPSTREAM_MODEL": "qwen", "LOOPSTREAM_ACTION_MODE": "json_text"}
    p, _ = make_provider(env=env)
    assert isinstance(p, OpenAICompatProvider) and (p.action_mode, p.model) == ("json_text", "qwen")
    p, _ = make_provider(action_mode="json_schema", env=env)
    assert p.action_mode == "json_schema"
    p, _ = make_provider(env={k: v for k, v in env.items() if k != "LOOPSTREAM_ACTION_MODE"})
    assert p.action_mode == "native"


def test_factory_model_with_both_keys_prefers_openai_for_non_claude() -> None:
    p, _ = make_provider("gpt-4o-mini", env={"ANTHROPIC_API_KEY": "k", "OPENAI_API_KEY": "o"})
    assert isinstance(p, OpenAICompatProvider)


@pytest.mark.parametrize(
    ("kwargs", "env", "fragment"),
    [
        ({"provider": "anthropic"}, {}, "ANTHROPIC_API_KEY"),
        ({"provider": "openai"}, {}, "OPENAI_API_KEY"),
        ({"model": "gpt-4o"}, {"ANTHROPIC_API_KEY": "k"}, "OPENAI_API_KEY"),
        ({"provider": "bogus"}, {}, "unknown provider"),
        ({"action_mode": "xml"}, {}, "unknown action mode"),
        ({}, {"OPENAI_BASE_URL": "http://127.0.0.1:1/v1"}, "LOOPSTREAM_MODEL"),
        ({"provider": "anthropic", "action_mode": "json_text"}, {"ANTHROPIC_API_KEY": "k"}, "only supports"),
        ({"model": "llama3"}, {}, "no provider for model"),
        ({"provider": "local", "model": "llama3"}, {}, "unknown local model 'llama3'"),
    ],
)
def test_factory_config_errors(kwargs: dict[str, Any], env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ProviderConfigError) as info:
        make_provider(**kwargs, env=env)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_factory_local_default_is_unstarted_server_context() -> None:
    if importlib.util.find_spec("xllamacpp") is None:
        with pytest.raises(ProviderConfigError, match="loopstream\\[local\\]"):
            make_provider(env={})
        return
    from loopstream.providers.local import LocalServer
    from loopstream.providers.local_shared import SharedLocalProvider, SharedLocalServer

    p, ctx = make_provider(env={})  # shared by default: a lease on the machine's server, not taken yet
    assert isinstance(ctx, SharedLocalServer) and ctx.state is None and ctx.idle == 300
    assert isinstance(p, SharedLocalProvider) and p.name == "local" and p.action_mode == "json_schema"
    assert p.sampling == Sampling()

    p, ctx = make_provider(env={"LOOPSTREAM_LOCAL_SHARED": "0"})  # opted out: this run's own server
    assert isinstance(ctx, LocalServer) and ctx._server is None
    assert isinstance(p, OpenAICompatProvider) and p.name == "local" and p.action_mode == "json_schema"
    assert p.base_url == ctx.base_url and p.sampling == Sampling()

    with pytest.raises(ProviderConfigError, match="LOOPSTREAM_LOCAL_IDLE_SECONDS"):
        make_provider(env={"LOOPSTREAM_LOCAL_IDLE_SECONDS": "5 minutes"})


def test_open_provider_yields_and_closes() -> None:
    with open_provider(env={"OPENAI_API_KEY": "o"}) as p:
        assert isinstance(p, OpenAICompatProvider)
        assert not p._client.is_closed
    assert p._client.is_closed


def test_anthropic_counts_tokens_with_its_endpoint() -> None:
    rec = Recorder(ok({"input_tokens": 321}))
    from loopstream.providers.tokens import count_tokens

    assert count_tokens(anthropic(rec), CONVERSATION) == 321
    assert str(rec.requests[0].url) == "http://anthropic.test/v1/messages/count_tokens"
    assert rec.body["system"] == "Be brief." and "max_tokens" not in rec.body


def test_servers_without_a_counting_endpoint_are_estimated() -> None:
    from loopstream.providers.tokens import count_tokens, estimate_tokens

    rec = Recorder(ok({}))
    assert count_tokens(openai(rec), CONVERSATION) == estimate_tokens(CONVERSATION, "openai")
    assert rec.requests == []  # no request was made
