"""Loop detection on the real 0.5B local model, on the task that once looped: asked for the
project name and version in pyproject.toml, the model called read_file(pyproject.toml) twelve
times until the step budget ended the session. Now the harness notices by the third call."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from tests.test_cli import cli

pytestmark = [pytest.mark.local, pytest.mark.slow]


def test_the_pyproject_task_does_not_loop_until_the_step_budget(tmp_path: Path, local_cache: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "tinyapp"\nversion = "2.4.1"\n')
    env = {"LOOPSTREAM_CACHE_DIR": str(local_cache), "LOOPSTREAM_LOCAL_IDLE_SECONDS": "2"}
    r = cli("run", "--tools", "read_file,list_dir", "--max-steps", "12", "--",
            "What is the project name and version in pyproject.toml? Use read_file.",
            cwd=tmp_path, timeout=900, env=env)
    assert r.returncode in (0, 1), r.stderr[-2000:]
    with SQLiteLog(tmp_path / ".loopstream" / "loopstream.db") as log:
        [session] = log.sessions()
        events = log.read(session.session_id)
    state = fold(events)
    calls = [json.dumps([e.payload.name, json.loads(e.payload.arguments_json)], sort_keys=True)
             for e in events if e.type == "ToolRequested"]
    worst = max((calls.count(c) for c in set(calls)), default=0)
    assert worst <= state.policy.loops.max_identical_calls  # the third identical call never ran
    assert state.step < 12  # the step budget is not what ended it
    # It ends by an answer (right or wrong: the model's part) or by loop detection, never by the budget.
    assert state.status == "done" or events[-1].payload.error_kind == "loop", events[-1].payload
