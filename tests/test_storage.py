"""Storage grows linearly: no event copies the context, so bytes per step stay flat."""
from __future__ import annotations

from loopstream.core.sqlite_log import SQLiteLog
from loopstream.providers.scripted import ScriptedProvider, adder_script
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig


def test_bytes_per_step_at_step_200_within_1_5x_of_step_10(tmp_path) -> None:
    with SQLiteLog(tmp_path / "s.db") as log:
        rt = build_runtime(log, ScriptedProvider(adder_script(200)))
        sid = rt.start_session("count to 200", SessionConfig(provider="scripted", model="s", tools=["add"], max_steps=250))
        assert rt.run_session(sid).status == "done"
        sizes = [len(b) for b in log.read_raw(sid)]
    # Events of step k: ModelRequested, ModelResponded, ToolRequested, ToolCompleted.
    step = lambda k: sum(sizes[2 + 4 * (k - 1): 2 + 4 * k])  # noqa: E731
    per_step_10, per_step_200 = step(10), step(200)
    assert per_step_200 <= 1.5 * per_step_10, (per_step_10, per_step_200)
    # And the total is linear: the last 100 steps take about as much as the first 100.
    first, last = sum(step(k) for k in range(1, 101)), sum(step(k) for k in range(101, 201))
    assert last <= 1.5 * first
