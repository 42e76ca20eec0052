"""Replay and fork speed on the embedded SQLite log.

    python bench/bench_replay.py [--steps 249] [--repeat 30] [--db PATH]

Builds a scripted session of ~1,000 events (249 tool steps: 2 + 4*249 + 3 = 1,001), then
times, best of --repeat runs:
  - verify: the hash chain over the stored bytes
  - rebuild: read + decode + fold + verify (the replay's core; target >= 100k events/s)
  - replay report: the same plus the timeline (what `loopstream replay` shows)
  - determinism check: the in-process driver re-run over the session (recorded replies, frozen clock)
  - fork at event 500 (by reference on SQLite: SessionForked alone; target well under 1 s)
and a breakdown of the rebuild (read, decode, fold, verify). Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from loopstream.core.codec import decode_prefix
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import SessionState, apply
from loopstream.providers.scripted import ScriptedProvider, adder_script
from loopstream.replay import check_determinism, fork, replay, verify_raw
from loopstream.replay.replayer import rebuild
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig


def best(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=249, help="tool steps (events = 5 + 4 * steps)")
    ap.add_argument("--repeat", type=int, default=30, help="runs per figure; the best and the median are shown")
    ap.add_argument("--db", type=Path, default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "bench.db"
        log = SQLiteLog(db)
        rt = build_runtime(log, ScriptedProvider(adder_script(args.steps)))
        t = time.perf_counter()
        sid = rt.start_session("count", SessionConfig(provider="scripted", model="scripted:adder",
                                                      tools=["add"], max_steps=args.steps + 5))
        state = rt.run_session(sid)
        build_s = time.perf_counter() - t
        raw = log.read_raw(sid)
        n = len(raw)
        print(f"session {sid}: {n} events, {sum(map(len, raw)):,} bytes, status {state.status} "
              f"(built live in {build_s:.2f} s)")

        def rebuild_all() -> None:
            data = log.read_raw(sid)
            chain = verify_raw(data, sid)
            _, st, err, _ = rebuild(data)
            assert chain.ok and err is None and st.status == "done"

        rows = [
            ("verify (chain only)", lambda: verify_raw(log.read_raw(sid), sid)),
            ("rebuild: read+decode+fold+verify", rebuild_all),
            ("replay report (+ timeline)", lambda: replay(log, sid)),
            ("determinism check", lambda: check_determinism(log, sid)),
        ]
        print(f"{'':36}{'best':>10}{'median':>10}{'events/s (best)':>18}")
        for name, fn in rows:
            lo, med = best(fn, args.repeat)
            print(f"{name:36}{lo * 1000:>8.1f}ms{med * 1000:>8.1f}ms{n / lo:>18,.0f}")

        # Where the rebuild's time goes.
        parts = {}
        parts["read_raw"], _ = best(lambda: log.read_raw(sid), args.repeat)
        parts["decode"], _ = best(lambda: decode_prefix(raw), args.repeat)
        events, _ = decode_prefix(raw)

        def fold_only() -> None:
            s = SessionState()
            for e in events:
                apply(s, e)

        parts["fold (apply)"], _ = best(fold_only, args.repeat)
        parts["verify"], _ = best(lambda: verify_raw(raw, sid), args.repeat)
        print("rebuild breakdown: " + " · ".join(f"{k} {v / n * 1e6:.2f} µs/event" for k, v in parts.items()))

        at = min(500, n - 2)
        forks = []

        def do_fork() -> None:
            forks.append(fork(log, sid, at, reason="bench", model="other"))

        lo, med = best(do_fork, args.repeat)
        f = forks[-1]
        print(f"fork at {at}: best {lo * 1000:.1f} ms, median {med * 1000:.1f} ms "
              f"({f.events_referred} events referred to, {f.events_copied} events / {f.bytes_copied:,} bytes "
              f"copied; child {f.child_session_id} "
              f"{f.state.status})")
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
