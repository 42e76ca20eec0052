"""End to end on the real local model: llama.cpp's server (xllamacpp) with
Qwen2.5-Coder-0.5B-Instruct, started by `loopstream run` itself, as a user would (the
shared server, in a cache dir of the test's own, stopping 2 s after the run)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_cli import cli

pytestmark = [pytest.mark.local, pytest.mark.slow]


def test_quick_start_goal_on_the_local_model(tmp_path: Path, local_cache: Path) -> None:
    env = {"LOOPSTREAM_CACHE_DIR": str(local_cache), "LOOPSTREAM_LOCAL_IDLE_SECONDS": "2"}
    r = cli("run", "What is 40213 + 1999? Use the add tool.", cwd=tmp_path, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "42212" in r.stdout
    sid = next(line.split()[1] for line in r.stderr.splitlines() if line.startswith("session ") and "steps" in line)
    shown = cli("show", sid, cwd=tmp_path, env=env)
    assert shown.returncode == 0
    assert "ModelResponded" in shown.stdout and "ToolCompleted" in shown.stdout
    assert "add(a=40213, b=1999)" in shown.stdout and "42212" in shown.stdout
