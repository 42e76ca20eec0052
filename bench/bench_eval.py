"""The example eval suite (examples/eval/arithmetic.toml) on the real local model, or any
model the CLI's options pick, and the cost of the observability projections.

    python bench/bench_eval.py [--suite examples/eval/arithmetic.toml] [--cases N] [--ab]

Runs the suite through `loopstream eval` (a fresh SQLite log in a temporary directory) and
prints the wall time, the report, then times `loopstream stats` and the span derivation of
every session of that log. Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loopstream.core.sqlite_log import SQLiteLog
from loopstream.observe.spans import session_spans
from loopstream.observe.suite import load_suite

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default=str(ROOT / "examples" / "eval" / "arithmetic.toml"))
    ap.add_argument("--cases", type=int, default=0, help="only the first N cases (0: all)")
    ap.add_argument("--ab", action="store_true", help="A/B by fork of the first two variants")
    ap.add_argument("extra", nargs="*", help="more `loopstream eval` options, after --")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        suite_path = Path(args.suite)
        if args.cases:
            suite = load_suite(suite_path)
            text = suite_path.read_text()
            head, *cases = text.split("[[cases]]")
            suite_path = Path(tmp) / suite_path.name
            suite_path.write_text(head + "".join("[[cases]]" + c for c in cases[: args.cases]))
            (Path(tmp) / "graders.py").write_text((Path(args.suite).parent / "graders.py").read_text())
            print(f"suite {suite.name}: first {args.cases} of {len(suite.cases)} cases")
        db = Path(tmp) / "log.db"
        cmd = [sys.executable, "-m", "loopstream.cli.app", "eval", str(suite_path), "--db", str(db), *args.extra]
        if args.ab:
            variants = load_suite(suite_path).variants
            cmd += ["--ab", f"{variants[0].name},{variants[1].name}"]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        print(out.stdout + out.stderr)
        print(f"eval wall time: {wall:.1f} s (exit {out.returncode})")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "loopstream.cli.app", "stats", "--db", str(db)], capture_output=True)
        print(f"stats (CLI, incl. start-up): {time.perf_counter() - t0:.2f} s")
        with SQLiteLog(db, readonly=True) as log:
            sessions = [i.session_id for i in log.sessions()]
            t0 = time.perf_counter()
            spans = sum(len(session_spans(log.read(s))) for s in sessions)
            print(f"spans of {len(sessions)} sessions: {spans} in {time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()
