"""The bundled local model (Qwen2.5-Coder-0.5B-Instruct on llama.cpp): assembly and json_schema calls."""
from __future__ import annotations

import dataclasses
import hashlib
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from loopstream.providers import LocalModelError, Message, ToolSpec, local
from loopstream.providers.local import MODEL_NAME, ensure_local_model, local_provider

ADD = ToolSpec(
    name="add",
    description="Add two integers and return their sum.",
    parameters={"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]},
)


@pytest.mark.local
def test_add_tool_call_then_final_answer(local_server: Any) -> None:
    provider = local_provider(local_server)
    messages = [
        Message(role="system", content="You are a careful assistant. Use tools; do not guess results."),
        Message(role="user", content="What is 40213 + 1999? Use the add tool."),
    ]
    first = provider.complete(messages, [ADD])
    assert first.mode == "json_schema" and first.model == MODEL_NAME
    assert [(c.name, c.arguments) for c in first.tool_calls] == [("add", {"a": 40213, "b": 1999})]
    assert first.input_tokens > 0 and first.output_tokens > 0

    call = first.tool_calls[0]
    messages += [
        Message(role="assistant", content=first.text, tool_calls=first.tool_calls),
        Message(role="tool", content="42212", tool_call_id=call.call_id, name=call.name),
    ]
    second = provider.complete(messages, [ADD])
    assert second.tool_calls == []
    assert "42212" in second.text
    provider.close()


# ---------------------------------------------------------------- assembling the model file (small stand-in parts)


@pytest.fixture(params=["0.5b", "1.5b"])
def tiny(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[local.LocalModel, bytes]:
    """A stand-in for each shipped model: its real part module names, small parts, and the
    hash and size of their concatenation."""
    real = local.LOCAL_MODELS[request.param]
    data = b""
    for i, name in enumerate(real.parts, 1):
        part = tmp_path / f"part{i}.bin"
        part.write_bytes(bytes([i]) * (100 + i))
        data += part.read_bytes()
        module = types.ModuleType(name)
        module.get_part_path = lambda p=part: str(p)  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return dataclasses.replace(real, sha256=hashlib.sha256(data).hexdigest(), size=len(data)), data


def test_assembles_verifies_and_reuses(tmp_path: Path, tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = tiny
    cache = tmp_path / "cache"
    path = ensure_local_model(cache, model)
    assert path.read_bytes() == data and path.name == f"{model.name}.gguf"
    assert (cache / f"{path.name}.sha256").read_text().strip() == model.sha256
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temp file left
    # Once verified, the part packages are no longer needed.
    monkeypatch.setitem(sys.modules, model.parts[2], None)
    assert ensure_local_model(cache, model) == path


def test_env_cache_dir(tmp_path: Path, tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPSTREAM_CACHE_DIR", str(tmp_path / "envcache"))
    assert ensure_local_model(model=tiny[0]).parent == tmp_path / "envcache"


def test_hash_mismatch_is_a_clear_error(tmp_path: Path, tiny) -> None:
    model = dataclasses.replace(tiny[0], sha256="0" * 64)
    with pytest.raises(LocalModelError, match=rf"SHA-256 mismatch.*loopstream\[{model.extra}\]"):
        ensure_local_model(tmp_path / "c", model)
    assert list((tmp_path / "c").iterdir()) == []


def test_missing_part_package(tmp_path: Path, tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny[0]
    monkeypatch.setitem(sys.modules, model.parts[4], None)  # import fails
    with pytest.raises(LocalModelError, match=rf"missing {model.parts[4]}.*pip install 'loopstream\[{model.extra}\]'"):
        ensure_local_model(tmp_path / "c", model)


def test_a_local_model_is_chosen_by_key_or_name() -> None:
    assert local.local_model(None) is local.local_model("local") is local.DEFAULT_MODEL
    assert local.local_model("1.5B").name == local.local_model("qwen2.5-coder-1.5b-instruct").name
    assert local.LOCAL_MODELS["1.5b"].size == 1_117_320_768 and len(local.LOCAL_MODELS["1.5b"].parts) == 22
    with pytest.raises(ValueError, match=r"unknown local model '7b'; known: 0\.5b .*, 1\.5b"):
        local.local_model("7b")


def test_local_server_counts_tokens_exactly(local_server) -> None:
    from loopstream.providers.base import Message
    from loopstream.providers.local import local_provider
    from loopstream.providers.tokens import count_tokens, estimate_tokens

    provider = local_provider(local_server)
    short = [Message(role="user", content="hi")]
    longer = short + [Message(role="assistant", content="Hello! How can I help you today?"),
                      Message(role="user", content="Count the words in this sentence, please.")]
    exact_short, exact_long = count_tokens(provider, short), count_tokens(provider, longer)
    assert 0 < exact_short < exact_long
    assert exact_long - exact_short >= 15  # two more turns: their words and template markers
    # The same number the server bills for that prompt (a real call with the same messages).
    assert provider.complete(longer, []).input_tokens == exact_long
    assert exact_long != estimate_tokens(longer, "local")
