"""Sub-agents in-process (docs/subagents.md): one parent fans out to N child sessions.

    python bench/bench_subagents.py [--children 100] [--parallel 1,4,16] [--repeat 3]

The scripted model (providers/scripted.py `fanout`): the parent calls spawn_agents with N
tasks `add i i+1`; each child calls the `add` tool once and answers; the parent sums the
answers. Everything runs over a real SQLite file in a temp dir (durability NORMAL, the
default). Printed per pool width (`[delegation] max_parallel`): the wall time of the whole
tree, the time of the delegation alone (the parent's ChildrenStarted to its ToolCompleted),
the per-child overhead (that time / N: the harness's cost of one child session of 9 events,
the model and the tool costing microseconds), and, for scale, one lone session of the same
shape as a child run by itself. Each figure is the smallest of `--repeat` runs (the cores are
shared). Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from loopstream.core.sqlite_log import SQLiteLog
from loopstream.providers.scripted import ScriptedProvider, fanout_script
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig


def tree(children: int, parallel: int) -> tuple[float, float, int]:
    """(wall s of the tree, s of the delegation, events in the tree)."""
    with tempfile.TemporaryDirectory() as tmp, SQLiteLog(Path(tmp) / "bench.db") as log:
        rt = build_runtime(log, ScriptedProvider(fanout_script(children)))
        config = SessionConfig(provider="scripted", model="fanout", tools=["add", "spawn_agents"],
                               policy={"delegation": {"max_children": children, "max_parallel": parallel}})
        began = time.perf_counter()
        sid = rt.start_session("sum the sums", config)
        state = rt.run_session(sid)
        wall = time.perf_counter() - began
        assert state.status == "done", state.error
        events = log.read(sid)
        t0 = next(e.time for e in events if e.type == "ChildrenStarted")
        t1 = next(e.time for e in events if e.type == "ToolCompleted")
        total = sum(log.next_seq(s.session_id) for s in log.sessions())
    return wall, (t1 - t0) / 1000, total


def lone() -> float:
    with tempfile.TemporaryDirectory() as tmp, SQLiteLog(Path(tmp) / "bench.db") as log:
        rt = build_runtime(log, ScriptedProvider(fanout_script(1)))
        config = SessionConfig(provider="scripted", model="fanout", tools=["add"])
        began = time.perf_counter()
        rt.run_session(rt.start_session("add 1 2", config))
        return time.perf_counter() - began


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--children", type=int, default=100)
    ap.add_argument("--parallel", default="1,4,16")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    single = min(lone() for _ in range(max(3, args.repeat)))
    print(f"one lone session of a child's shape (9 events): {single * 1000:.1f} ms")
    print(f"{'pool':>5} {'tree wall':>10} {'delegation':>11} {'per child':>10} {'events':>7}")
    for width in (int(w) for w in args.parallel.split(",")):
        runs = [tree(args.children, width) for _ in range(args.repeat)]
        wall = min(r[0] for r in runs)
        deleg = min(r[1] for r in runs)
        print(f"{width:>5} {wall:>9.3f}s {deleg:>10.3f}s {deleg / args.children * 1000:>8.2f}ms {runs[0][2]:>7}")


if __name__ == "__main__":
    main()
