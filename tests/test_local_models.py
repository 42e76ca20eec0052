"""Choosing a bundled local model: `--local-model 0.5b|1.5b`. The choice errors are tested
without a model; the 1.5B itself (assembled from its 22 parts, checked by SHA-256, answering a
tool task on llama.cpp) runs where the [local-1-5b] extra is installed."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from loopstream.providers.base import Message
from loopstream.providers.local import LOCAL_MODELS, LocalServer, ensure_local_model, local_provider
from tests.test_cli import cli
from tests.test_local_model import ADD

ONE_FIVE = LOCAL_MODELS["1.5b"]


@pytest.mark.parametrize(("args", "message"), [
    (["--local-model", "7b"], "--local-model: unknown local model '7b'; known: 0.5b"),
    (["--local-model", "1.5b", "--provider", "openai"], "--local-model picks the provider and the model"),
    (["--local-model", "1.5b", "--model", "gpt-4o"], "--local-model picks the provider and the model"),
])
def test_a_bad_local_model_choice_is_a_one_line_error(tmp_path: Path, args: list[str], message: str) -> None:
    r = cli("run", *args, "--", "hello", cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / ".loopstream").exists()  # nothing ran, no log was created


def test_the_1_5b_without_its_extra_names_the_extra(tmp_path: Path) -> None:
    if all(importlib.util.find_spec(m) for m in ONE_FIVE.parts):
        pytest.skip("the [local-1-5b] extra is installed")
    r = cli("run", "--local-model", "1.5b", "--", "What is 2 + 3?", cwd=tmp_path,
            env={"LOOPSTREAM_CACHE_DIR": str(tmp_path / "cache"), "LOOPSTREAM_LOCAL_SHARED": "0"})
    assert r.returncode != 0 and "pip install 'loopstream[local-1-5b]'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.local
def test_the_1_5b_assembles_verifies_and_calls_a_tool() -> None:
    for name in ("xllamacpp", *ONE_FIVE.parts):
        pytest.importorskip(name, reason="needs the [local-1-5b] extra")
    path = ensure_local_model(model=ONE_FIVE)  # the pinned SHA-256 checked on assembly
    assert path.stat().st_size == ONE_FIVE.size and path.name == "qwen2.5-coder-1.5b-instruct.gguf"
    with LocalServer(model=ONE_FIVE) as server:
        provider = local_provider(server)
        reply = provider.complete([Message(role="user", content="What is 40213 + 1999? Use the add tool.")], [ADD])
        assert reply.model == ONE_FIVE.name
        assert [(c.name, c.arguments) for c in reply.tool_calls] == [("add", {"a": 40213, "b": 1999})]
        provider.close()
