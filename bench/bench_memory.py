"""What memory costs: remembering N notes through real sessions (scripted model, SQLite log),
then the start of a session (its recall within the budget), a search, a catch-up after one
more memory, and a rebuild of the store from the log.

    python bench/bench_memory.py [N]
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from loopstream.core.memory import MemoryStore, recall_at_start
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from loopstream.providers.base import ModelReply, ToolCall
from loopstream.providers.scripted import ScriptedProvider
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig

WORDS = "deploy staging postgres cache queue worker build test lint docs api auth billing search index".split()


def note(i: int) -> str:
    return f"note {i}: the {WORDS[i % len(WORDS)]} of {WORDS[(i * 7) % len(WORDS)]} is on host-{i % 97}"


def main(n: int = 300) -> None:
    os.environ.setdefault("LOOPSTREAM_USER", "bench")
    with tempfile.TemporaryDirectory() as tmp:
        config = SessionConfig(provider="scripted", model="scripted", tools=["add"], agent="bench", workdir=tmp,
                               policy={"memory": {"enabled": True, "max_items": 100_000}})
        with SQLiteLog(Path(tmp) / "bench.db") as log:
            rt = build_runtime(log, ScriptedProvider(lambda m: ModelReply(
                text="", tool_calls=[ToolCall(call_id="c", name="remember", arguments={"text": m[-1].content})],
                input_tokens=1, output_tokens=1) if m[-1].role == "user" else ModelReply(text="ok")))
            t = time.perf_counter()
            sids = [rt.start_session(note(i), config) for i in range(n)]
            started = time.perf_counter() - t
            t = time.perf_counter()
            for sid in sids:
                rt.run_session(sid)
            ran = time.perf_counter() - t
            events = sum(log.next_seq(s) for s in sids)
            with MemoryStore(log.path) as store:
                settings = fold(log.read(sids[0])).policy.memory
                t = time.perf_counter()
                recalled = recall_at_start(store, "which host has the staging postgres?", settings)
                recall_ms = (time.perf_counter() - t) * 1000
                t = time.perf_counter()
                for _ in range(100):
                    store.search("staging postgres deploy", settings.namespace, 10)
                search_ms = (time.perf_counter() - t) * 10
                t = time.perf_counter()
                applied = store.rebuild()
                rebuild_ms = (time.perf_counter() - t) * 1000
                count = store.count()
        print(f"{n} sessions, each remembering one note ({events} events): starts {started / n * 1000:.2f} ms "
              f"each (with the recall), runs {ran / n * 1000:.2f} ms each")
        print(f"store: {count} memories; start-of-session recall {recall_ms:.2f} ms "
              f"({len(recalled.memory_ids)} memories, ~{recalled.tokens} tokens); search {search_ms:.3f} ms; "
              f"rebuild from the log {rebuild_ms:.1f} ms ({applied} events)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
