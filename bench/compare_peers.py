"""loopstream side by side with LangGraph (SqliteSaver) and Burr (SQLite persister).

    python bench/compare_peers.py [--steps 10,1000] [--rounds 3] [--only loopstream,langgraph,burr]

The same scripted ReAct workload on each: N steps, each one model turn (scripted: no model
call, it answers at once) that asks for one `add` call, and the tool's result (~2 KB: the sum,
then padding) goes back into the conversation; a final answer ends the run. Each framework
persists to its own SQLite file in WAL mode with synchronous=NORMAL (the same durability).
Measured per framework, rounds interleaved (loopstream, LangGraph, Burr, loopstream, …) so a
noisy neighbour on the shared cores hits all alike; each figure is the smallest over the rounds:

- per step µs: wall time of the whole run / N, at each N;
- storage: the database file's bytes (WAL checkpointed) after the run at the largest N;
- fork: a new run that starts from the state after the middle step (loopstream: `fork` at
  the middle event; LangGraph: `update_state` from the mid checkpoint's config; Burr: a new
  application `initialize_from` the mid sequence id with a fork id);
- latest state: a fresh handle on the file reads the session's state at its head.

The peers are the `[bench]` extra (pip install 'loopstream[bench]'); a peer that is not
installed is skipped. Prints figures (and ratios to loopstream); asserts nothing.
"""
from __future__ import annotations

import argparse
import gc
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PAD = 2_000  # characters of padding in each tool result: ~2 KB per step


def result_text(total: int) -> str:
    return f"{total}\n" + ("x" * PAD)


def _db_bytes(path: Path) -> int:
    """The file's size with its WAL folded in (checkpointed), as it would sit on disk."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


class Figures(dict):
    """name -> list of samples (seconds or bytes); `best` the smallest."""

    def add(self, name: str, value: float) -> None:
        self.setdefault(name, []).append(value)

    def best(self, name: str) -> float | None:
        return min(self[name]) if name in self else None


# -- loopstream ----------------------------------------------------------------------------


def loopstream_run(tmp: Path, steps: int, figs: Figures, detail: bool) -> None:
    from loopstream.core.conversation import Message, ToolCall
    from loopstream.core.sqlite_log import SQLiteLog
    from loopstream.providers.base import ModelReply
    from loopstream.providers.scripted import ScriptedProvider
    from loopstream.replay.fork import fork
    from loopstream.runtime.assembly import build_runtime
    from loopstream.runtime.inline import SessionConfig
    from loopstream.runtime.writer import SessionWriter
    from loopstream.tools.registry import ToolRegistry, tool

    @tool(read_only=True)
    def add(a: float, b: float) -> str:
        """Add two numbers (the sum, then ~2 KB of padding)."""
        return result_text(int(a + b))

    def script(messages: list[Message]) -> ModelReply:
        results = [m.content for m in messages if m.role == "tool"]
        done = int(results[-1].split("\n", 1)[0]) if results else 0
        if done < steps:
            call = ToolCall(call_id=f"c{done}", name="add", arguments={"a": done, "b": 1})
            return ModelReply(text="", tool_calls=[call], input_tokens=10, output_tokens=5, mode="native")
        return ModelReply(text=f"The result is {done}.", input_tokens=10, output_tokens=6)

    path = tmp / f"ls-{steps}.db"
    registry = ToolRegistry().add(add)
    with SQLiteLog(path) as log:
        rt = build_runtime(log, ScriptedProvider(script), registry)
        config = SessionConfig(provider="scripted", model="scripted:pad", tools=["add"], max_steps=steps + 5,
                               workdir=str(tmp))
        t = time.perf_counter()
        sid = rt.start_session("count", config)
        state = rt.run_session(sid)
        figs.add(f"step_us@{steps}", (time.perf_counter() - t) / steps * 1e6)
        assert state.status == "done", state.status
        if not detail:
            return
        n = log.next_seq(sid)
        events = log.read(sid, n // 2 - 8, n // 2 + 8)
        mid = next(e.seq for e in events if e.type == "ToolCompleted")  # after a whole step
        t = time.perf_counter()
        fork(log, sid, mid, reason="bench", registry=registry)
        figs.add(f"fork_ms@{steps}", (time.perf_counter() - t) * 1e3)
    figs.add(f"bytes@{steps}", _db_bytes(path))
    figs.add(f"events@{steps}", n)
    with SQLiteLog(path, readonly=True) as log:
        t = time.perf_counter()
        SessionWriter(log).load(sid)
        figs.add(f"latest_ms@{steps}", (time.perf_counter() - t) * 1e3)


# -- LangGraph (SqliteSaver) ----------------------------------------------------------------


def langgraph_run(tmp: Path, steps: int, figs: Figures, detail: bool) -> None:
    from typing import Annotated, TypedDict

    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.graph import END, START, StateGraph
    from langgraph.graph.message import add_messages

    State = TypedDict("State", {"messages": Annotated[list, add_messages], "total": int})  # noqa: UP013

    def model(state):  # no annotations: LangGraph reads them at run time
        done = state["total"]
        if done < steps:
            msg = {"role": "assistant", "content": "", "tool_calls": [
                {"id": f"c{done}", "name": "add", "args": {"a": done, "b": 1}}]}
        else:
            msg = {"role": "assistant", "content": f"The result is {done}."}
        return {"messages": [msg]}

    def tools(state):
        call = state["messages"][-1].tool_calls[0]
        total = int(call["args"]["a"] + call["args"]["b"])
        return {"messages": [{"role": "tool", "content": result_text(total), "tool_call_id": call["id"]}],
                "total": total}

    def route(state):
        return "tools" if state["messages"][-1].tool_calls else END

    g = StateGraph(State)
    g.add_node("model", model)
    g.add_node("tools", tools)
    g.add_edge(START, "model")
    g.add_conditional_edges("model", route, ["tools", END])
    g.add_edge("tools", "model")

    path = tmp / f"lg-{steps}.db"
    conn = sqlite3.connect(path, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    saver = SqliteSaver(conn)
    app = g.compile(checkpointer=saver)
    cfg = {"configurable": {"thread_id": "t1"}, "recursion_limit": 2 * steps + 10}
    t = time.perf_counter()
    app.invoke({"messages": [{"role": "user", "content": "count"}], "total": 0}, cfg)
    figs.add(f"step_us@{steps}", (time.perf_counter() - t) / steps * 1e6)
    if detail:
        history = list(app.get_state_history(cfg))  # newest first
        mid = history[len(history) // 2].config
        t = time.perf_counter()
        app.update_state(mid, {"total": steps}, as_node="tools")  # a new branch from the mid checkpoint
        figs.add(f"fork_ms@{steps}", (time.perf_counter() - t) * 1e3)
    conn.close()
    if detail:
        figs.add(f"bytes@{steps}", _db_bytes(path))
        conn = sqlite3.connect(path, check_same_thread=False)
        app = g.compile(checkpointer=SqliteSaver(conn))
        t = time.perf_counter()
        app.get_state({"configurable": {"thread_id": "t1"}})
        figs.add(f"latest_ms@{steps}", (time.perf_counter() - t) * 1e3)
        conn.close()


# -- Burr (SQLite persister) ----------------------------------------------------------------


def burr_run(tmp: Path, steps: int, figs: Figures, detail: bool) -> None:
    from burr.core import ApplicationBuilder, State, action, expr
    from burr.core.persistence import SQLitePersister

    @action(reads=["total"], writes=["messages", "pending"])
    def model(state: State) -> State:
        done = state["total"]
        if done < steps:
            msg = {"role": "assistant", "content": "", "tool_calls": [
                {"id": f"c{done}", "name": "add", "args": {"a": done, "b": 1}}]}
            return state.append(messages=msg).update(pending=msg["tool_calls"][0])
        return state.append(messages={"role": "assistant", "content": f"The result is {done}."}).update(pending=None)

    @action(reads=["pending"], writes=["messages", "total"])
    def tools(state: State) -> State:
        call = state["pending"]
        total = int(call["args"]["a"] + call["args"]["b"])
        return state.append(messages={"role": "tool", "content": result_text(total), "tool_call_id": call["id"]}
                            ).update(total=total)

    @action(reads=[], writes=[])
    def done(state: State) -> State:
        return state

    path = tmp / f"burr-{steps}.db"

    def persister() -> SQLitePersister:
        p = SQLitePersister(db_path=str(path), table_name="burr_state", connect_kwargs={"check_same_thread": False})
        p.connection.execute("PRAGMA journal_mode=WAL")
        p.connection.execute("PRAGMA synchronous=NORMAL")
        p.initialize()
        return p

    def build(p: SQLitePersister, app_id: str, resume: dict | None = None):
        b = (ApplicationBuilder().with_actions(model=model, tools=tools, done=done)
             .with_transitions(("model", "tools", expr("pending is not None")), ("model", "done"), ("tools", "model"))
             .with_state_persister(p))
        if resume is None:
            b = b.with_state(messages=[{"role": "user", "content": "count"}], total=0, pending=None).with_entrypoint(
                "model")
        else:
            b = b.initialize_from(p, resume_at_next_action=True, default_state={}, default_entrypoint="model",
                                  **resume)
        return b.with_identifiers(app_id=app_id, partition_key="p").build()

    p = persister()
    app = build(p, "a1")
    t = time.perf_counter()
    app.run(halt_after=["done"])
    figs.add(f"step_us@{steps}", (time.perf_counter() - t) / steps * 1e6)
    if detail:
        t = time.perf_counter()
        forked = build(p, "a1-fork", {"fork_from_app_id": "a1", "fork_from_sequence_id": steps,
                                      "fork_from_partition_key": "p"})
        forked.step()
        figs.add(f"fork_ms@{steps}", (time.perf_counter() - t) * 1e3)
    p.connection.close()
    if detail:
        figs.add(f"bytes@{steps}", _db_bytes(path))
        p = persister()
        t = time.perf_counter()
        p.load("p", "a1")
        figs.add(f"latest_ms@{steps}", (time.perf_counter() - t) * 1e3)
        p.connection.close()


PEERS: dict[str, Callable[[Path, int, Figures, bool], None]] = {
    "loopstream": loopstream_run, "langgraph": langgraph_run, "burr": burr_run}
MODULES = {"langgraph": "langgraph.checkpoint.sqlite", "burr": "burr.core.persistence"}


def available(name: str) -> bool:
    try:
        __import__(MODULES.get(name, "loopstream"))
    except ImportError as exc:
        print(f"{name}: skipped ({exc}; pip install 'loopstream[bench]')")
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="10,1000", help="comma-separated N (default 10,1000)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=",".join(PEERS))
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.steps.split(",")]
    names = [n for n in args.only.split(",") if n in PEERS and available(n)]
    figs = {n: Figures() for n in names}
    for r in range(args.rounds):
        for n in names:
            for steps in sizes:
                with tempfile.TemporaryDirectory(prefix=f"cmp-{n}-") as d:
                    gc.collect()
                    PEERS[n](Path(d), steps, figs[n], detail=steps == max(sizes))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; best of {args.rounds} interleaved rounds; "
          f"python {sys.version.split()[0]}")
    top = max(sizes)
    rows = [*(f"step_us@{s}" for s in sizes), f"fork_ms@{top}", f"latest_ms@{top}", f"bytes@{top}"]
    labels = {**{f"step_us@{s}": f"per step at N={s} (µs)" for s in sizes}, f"fork_ms@{top}": f"fork at N={top} (ms)",
              f"latest_ms@{top}": f"latest state at N={top} (ms)", f"bytes@{top}": f"storage at N={top} (bytes)"}
    print(f"{'':32}" + "".join(f"{n:>24}" for n in names))
    for row in rows:
        base = figs["loopstream"].best(row) if "loopstream" in figs else None
        cells = []
        for n in names:
            v = figs[n].best(row)
            if v is None:
                cells.append(f"{'-':>24}")
                continue
            text = f"{v:,.0f}" if row.startswith("bytes") or v >= 100 else f"{v:,.2f}"
            if base and n != "loopstream":
                text += f" ({v / base:.1f}x)"
            cells.append(f"{text:>24}")
        print(f"{labels[row]:32}" + "".join(cells))
    if "loopstream" in figs and (ev := figs["loopstream"].best(f"events@{top}")):
        print(f"(loopstream's session at N={top}: {ev:,.0f} events; medians: "
              + ", ".join(f"{k} {statistics.median(v):,.2f}" for k, v in figs["loopstream"].items()
                          if not k.startswith(("events", "bytes"))) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
