"""Sub-agents in-process (docs/subagents.md): one parent fans out to N child sessions.

    python bench/bench_subagents.py [--children 100] [--parallel 1,4,16] [--repeat 3] [--kafka [--bootstrap H:P]]

The scripted model (providers/scripted.py `fanout`): the parent calls spawn_agents with N
tasks `add i i+1`; each child calls the `add` tool once and answers; the parent sums the
answers. Everything runs over a real SQLite file in a temp dir (durability NORMAL, the
default). Printed per pool width (`[delegation] max_parallel`): the wall time of the whole
tree, the time of the delegation alone (the parent's ChildrenStarted to its ToolCompleted),
the per-child overhead (that time / N: the harness's cost of one child session of 9 events,
the model and the tool costing microseconds), and, for scale, one lone session of the same
shape as a child run by itself. Each figure is the smallest of `--repeat` runs (the cores are
shared). `--kafka`: the same tree over a Kafka-protocol broker (its own Tansu, as
bench_kafka.py starts it, unless `--bootstrap`), driven by three role workers (orchestrator,
model, tool) in this process, each with its own KafkaLog; the children run on any worker.
Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import sys
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


def tree_kafka(bootstrap: str, children: int, tmp: Path) -> tuple[float, float, int]:
    """(wall s of the tree, s of the delegation, events in the tree) over Kafka workers."""
    import threading
    import uuid

    from loopstream.core.state import fold
    from loopstream.kafka.log import KafkaLog
    from loopstream.runtime.assembly import processors_for
    from loopstream.runtime.worker import Worker
    from loopstream.runtime.writer import SessionWriter

    prefix = "bs" + uuid.uuid4().hex[:8]
    fast = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500, "fetch.wait.max.ms": 20}
    roles = ("orchestrator", "model", "tool")
    logs = {r: KafkaLog(bootstrap, topic=f"{prefix}.events", projection_path=tmp / f"{prefix}.{r}.db",
                        consumer_config=fast) for r in (*roles, "reader")}
    provider = ScriptedProvider(fanout_script(children))
    workers = [Worker(logs[r], processors_for(r, provider=provider, subagents=logs[r]), f"{prefix}.{r}",
                      concurrency=16) for r in roles]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    try:
        for th in threads:
            th.start()
        reader = logs["reader"]
        config = SessionConfig(provider="scripted", model="fanout", tools=["add", "spawn_agents"],
                               policy={"delegation": {"max_children": children}})
        began = time.perf_counter()
        sid = SessionWriter(reader).start("sum the sums", config)
        while not fold(reader.read(sid)).terminal:
            time.sleep(0.02)
        wall = time.perf_counter() - began
        events = reader.read(sid)
        t0 = next(e.time for e in events if e.type == "ChildrenStarted")
        t1 = next(e.time for e in events if e.type == "ToolCompleted")
        kids = [c.session_id for e in events if e.type == "ChildrenStarted" for c in e.payload.children]
        total = len(events) + sum(reader.next_seq(k) for k in kids)
        return wall, (t1 - t0) / 1000, total
    finally:
        for w in workers:
            w.stop()
        for th in threads:
            th.join(10)
        for log in logs.values():
            log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--children", type=int, default=100)
    ap.add_argument("--parallel", default="1,4,16")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kafka", action="store_true", help="also over Kafka workers")
    ap.add_argument("--bootstrap", default=None, help="a running broker (default: start Tansu)")
    args = ap.parse_args()
    single = min(lone() for _ in range(max(3, args.repeat)))
    print(f"one lone session of a child's shape (9 events): {single * 1000:.1f} ms")
    print(f"{'pool':>5} {'tree wall':>10} {'delegation':>11} {'per child':>10} {'events':>7}")
    for width in (int(w) for w in args.parallel.split(",")):
        runs = [tree(args.children, width) for _ in range(args.repeat)]
        wall = min(r[0] for r in runs)
        deleg = min(r[1] for r in runs)
        print(f"{width:>5} {wall:>9.3f}s {deleg:>10.3f}s {deleg / args.children * 1000:>8.2f}ms {runs[0][2]:>7}")
    if args.kafka:
        kafka(args)


def kafka(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_kafka import start_tansu

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker, bootstrap = (None, args.bootstrap) if args.bootstrap else start_tansu(tmp)
        try:
            runs = [tree_kafka(bootstrap, args.children, tmp) for _ in range(args.repeat)]
            wall, deleg = min(r[0] for r in runs), min(r[1] for r in runs)
            print(f"kafka {wall:>9.3f}s {deleg:>10.3f}s {deleg / args.children * 1000:>8.2f}ms {runs[0][2]:>7}"
                  f"  (3 role workers over {'Tansu ' if broker else ''}{bootstrap})")
        finally:
            if broker is not None:
                broker.terminate()
                broker.wait(5)


if __name__ == "__main__":
    main()
