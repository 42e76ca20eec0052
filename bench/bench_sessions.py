"""Throughput of many short scripted sessions in one process on one SQLite file: this tree
against a baseline commit, sessions/s.

    python bench/bench_sessions.py [--sessions 200] [--steps 10] [--threads 1,16] [--repeat 1]
                                   [--load 0] [--baseline 1e20bd3 | --no-baseline]

Each session is a scripted `adder:STEPS` run (providers/scripted.py: each step one model call
and one `add` call) driven by the in-process runtime; all of them append to one SQLite file
(one `SQLiteLog`, shared). `--threads` runs them on a pool of that many threads (1: one
after another). `--load K` keeps K busy-looping processes running during every measurement
(a loaded machine). Each tree (this working tree; the baseline from `git archive`, laid out
as bench/bench_step.py does) is measured in its own subprocess, alternating. Prints
sessions/s and the mean wall time of a session; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import _api, _use_tree, checkout, describe_head, lay_out  # noqa: E402


def measure(sessions: int, steps: int, threads: int) -> dict:
    """Run `sessions` scripted sessions on `threads` threads over one fresh SQLite file."""
    build_runtime, SessionConfig, SQLiteLog, scripted_from_spec = _api()
    with tempfile.TemporaryDirectory() as tmp, SQLiteLog(Path(tmp) / "bench.db") as log:
        def one(i: int) -> tuple[str, float]:
            started = time.perf_counter()
            rt = build_runtime(log, scripted_from_spec(f"adder:{steps}"))
            sid = rt.start_session(f"count {i}", SessionConfig(
                provider="scripted", model=f"scripted:adder:{steps}", tools=["add"], max_steps=steps + 5,
                workdir=tmp))
            state = rt.run_session(sid)
            return str(state.status), time.perf_counter() - started

        wall, cpu = time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(one, range(sessions)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        events = sum(s.next_seq for s in log.sessions())
    statuses = [s for s, _ in results]
    return {"wall": wall, "cpu": cpu, "events": events, "done": statuses.count("done"),
            "statuses": sorted(set(statuses)), "session_s": statistics.fmean(t for _, t in results)}


def run_child(tree: Path, sessions: int, steps: int, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", "--tree", str(tree),
           "--sessions", str(sessions), "--steps", str(steps), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tree)},
                          cwd=tree)
    if done.returncode != 0:
        sys.exit(f"measuring {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def burners(k: int) -> list[subprocess.Popen]:
    """K processes that keep a core busy each (the load), until stopped by their pids."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", default="1,16", help="comma-separated pool sizes to measure")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tree and pool size, alternating; medians")
    ap.add_argument("--load", type=int, default=0, help="busy-looping processes kept running meanwhile")
    ap.add_argument("--baseline", default="1e20bd3")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    pools = [int(t) for t in str(args.threads).split(",")]

    if args.measure:
        if args.tree is not None:
            _use_tree(args.tree)
        print(json.dumps(measure(args.sessions, args.steps, pools[0])))
        return 0

    rows: dict[tuple[str, int], list[dict]] = {}
    load = burners(args.load)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-sessions-") as tmp:
            trees = {"this": lay_out(Path(__file__).resolve().parent.parent, Path(tmp) / "this")}
            if not args.no_baseline:
                trees["base"] = lay_out(checkout(args.baseline, Path(tmp) / "src"), Path(tmp) / "base")
            for _ in range(args.repeat):
                for threads in pools:
                    for name, tree in trees.items():
                        rows.setdefault((name, threads), []).append(run_child(tree, args.sessions, args.steps, threads))
    finally:
        for p in load:
            p.kill()
            p.wait()

    names = {"this": f"this tree ({describe_head()})", "base": f"baseline {args.baseline}"}
    width = max(len(n) for n in names.values()) + 2
    print(f"{args.sessions} scripted sessions of {args.steps} steps (adder), one SQLite file, one process, "
          f"{args.repeat} run(s) each (medians); {args.load} busy-looping process(es) alongside; "
          f"{os.cpu_count()} cores, load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"\n{'':{width}}{'threads':>8}{'sessions/s':>12}{'s/session':>11}{'CPU ms/session':>16}  sessions done")
    for (name, threads), runs in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0] != "this")):
        rate = statistics.median(args.sessions / r["wall"] for r in runs)
        per = statistics.median(r["session_s"] for r in runs)
        cpu = statistics.median(r["cpu"] / args.sessions * 1000 for r in runs)
        done = min(r["done"] for r in runs)
        print(f"{names[name]:{width}}{threads:>8}{rate:>12.1f}{per:>11.3f}{cpu:>16.1f}  {done}/{args.sessions}"
              + ("" if done == args.sessions else f" ({runs[0]['statuses']})"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
