"""Per-step harness overhead of the embedded runtime: this tree against a baseline commit.

    python bench/bench_step.py [--steps 1000] [--repeat 3] [--baseline 2a6b4c3 | --no-baseline] [--full] [--profile]

A scripted session (providers/scripted.py, `adder:STEPS`: each step is one model call that
asks for one `add` call, so the model and the tool cost microseconds and what is left is the
harness: folds, FSM checks, envelopes, the hash chain, encoding, SQLite appends) runs over a
real SQLite file in a temp dir. A step is the time between two consecutive ModelRequested
events, less the time of the model call it made. Printed, in CPU time of the process (what a
step costs on shared cores) and in wall time: µs per step near step 10 and near the last step
(the median of the 11 steps around each: does it stay flat?) and the mean over the run, for
this tree and for the baseline commit, side by side with the ratio. Each figure is the
smallest over the `--repeat` runs (the least disturbed: the cores are shared; `--median` shows
medians instead). Each tree (this working
tree as it is; the baseline taken with `git archive`) has its folders laid out in a temp dir
as the `loopstream` package its pyproject describes, and is measured in its own subprocess,
alternating, `--repeat` times.
`--full` also measures this tree with `SQLiteLog(durability="full")` (an fsync per commit; the
default and the baseline are NORMAL). `--profile` adds a cProfile top-10 of this tree's run.
Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEAR = 5  # a figure "near step k" is the median of steps k-NEAR .. k+NEAR


# -- one measurement (in a subprocess, against whichever tree its sys.path gives) ----------


def _use_tree(tree: Path) -> None:
    """Import `loopstream` from `tree` (a laid-out package root), not from this venv's editable install."""
    sys.path.insert(0, str(tree))
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]


def _api():
    """(build_runtime, SessionConfig, SQLiteLog, scripted_from_spec) of the tree being measured:
    the public API where it exists, else the modules of the baseline's flat core/."""
    from loopstream.core.sqlite_log import SQLiteLog
    from loopstream.providers.scripted import scripted_from_spec
    try:
        from loopstream import SessionConfig, build_runtime
    except ImportError:  # before runtime/ and api/ existed
        from loopstream.core.agent import build_runtime
        from loopstream.core.runtime import SessionConfig
    return build_runtime, SessionConfig, SQLiteLog, scripted_from_spec


def _clocks() -> tuple[float, float]:
    """(wall, this process's CPU time in all its threads): the CPU figure is what a step costs
    when other processes share the cores; the wall figure adds their scheduling."""
    return time.perf_counter(), time.process_time()


class Timed:
    """The scripted provider, timed: its own time (it reads the whole conversation each call)
    is the model's, not the harness's, and is taken out of each step."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.spent: list[tuple[float, float]] = []  # (wall, cpu) seconds per call

    def complete(self, messages, tools, *args, **kwargs):  # sampling and timeout where the tree passes them
        start = _clocks()
        try:
            return self.inner.complete(messages, tools, *args, **kwargs)
        finally:
            end = _clocks()
            self.spent.append((end[0] - start[0], end[1] - start[1]))

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def measure(steps: int, profile: str | None = None, durability: str | None = None) -> dict:
    """Run one `adder:steps` session over a fresh SQLite file; the per-step figures in µs."""
    build_runtime, SessionConfig, SQLiteLog, scripted_from_spec = _api()
    import loopstream.core.fsm as fsm

    marks: list[tuple[float, float]] = []
    model = Timed(scripted_from_spec(f"adder:{steps}"))

    def on_event(event) -> None:
        if event.type == "ModelRequested":
            marks.append(_clocks())

    opened = {"durability": durability} if durability else {}  # a tree before the choice: its default (NORMAL)
    with tempfile.TemporaryDirectory() as tmp, SQLiteLog(Path(tmp) / "bench.db", **opened) as log:
        rt = build_runtime(log, model, on_event=on_event)
        sid = rt.start_session("count", SessionConfig(provider="scripted", model=f"scripted:adder:{steps}",
                                                      tools=["add"], max_steps=steps + 5, workdir=tmp))
        profiler = None
        if profile:
            import cProfile
            profiler = cProfile.Profile()
            profiler.enable()
        state = rt.run_session(sid)
        if profiler is not None:
            profiler.disable()
        events = len(log.read_raw(sid))
    out = {"fsm": os.path.realpath(fsm.__file__), "status": str(state.status), "events": events}
    for i, clock in enumerate(("wall", "cpu")):
        # step k: from ModelRequested k to ModelRequested k+1, less the model call it made
        step_us = [(b[i] - a[i] - m[i]) * 1e6 for a, b, m in zip(marks, marks[1:], model.spent)]
        model_us = [m[i] * 1e6 for m in model.spent[:len(step_us)]]
        out["steps"] = len(step_us)
        out[clock] = {"early": _near(step_us, 10), "late": _near(step_us, len(step_us)),
                      "mean": statistics.fmean(step_us),
                      "model_early": _near(model_us, 10), "model_late": _near(model_us, len(model_us))}
    if profiler is not None:
        import pstats
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(profile).print_stats(10)
        out["profile"] = text.getvalue()
    return out


def _near(values: list[float], step: int) -> float:
    """The median of the values of steps step-NEAR .. step+NEAR (step 1 is values[0])."""
    lo = min(max(0, step - 1 - NEAR), len(values) - (2 * NEAR + 1))
    return statistics.median(values[lo: lo + 2 * NEAR + 1])


# -- the driver ------------------------------------------------------------------------------


def checkout(commit: str, into: Path) -> Path:
    """`commit`'s files (`git archive`) in `into`."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def lay_out(src: Path, into: Path) -> Path:
    """The top-level folders of the tree `src` laid out in `into` as the `loopstream` package
    its pyproject's package-dir describes (symlinks); the root to put on sys.path."""
    mapping = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    (into / "loopstream").mkdir(parents=True)
    for name, folder in mapping.items():
        parts = name.split(".")
        if parts == ["loopstream"]:  # the top-level package itself (api/ in later trees): copy its modules
            for f in (src / folder).glob("*.py"):
                shutil.copy(f, into / "loopstream" / f.name)
        else:
            into.joinpath(*parts).symlink_to(src / folder, target_is_directory=True)
    return into


def run_child(steps: int, tree: Path, profile: str | None = None, durability: str | None = None) -> dict:
    """One measurement in a fresh interpreter that imports `loopstream` from `tree`."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", "--steps", str(steps), "--tree", str(tree)]
    if profile:
        cmd += ["--profile", profile]
    if durability:
        cmd += ["--durability", durability]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode != 0:
        sys.exit(f"measuring {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def describe_head() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    branch = subprocess.run(["git", "branch", "--show-current"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return f"{branch.stdout.strip() or '?'} @ {head.stdout.strip() or '?'}{' + changes' if dirty else ''}"


def _line(name: str, runs: list[dict], clock: str, width: int, pick=min) -> tuple[float, float, float]:
    early, late, mean = (pick(r[clock][k] for r in runs) for k in ("early", "late", "mean"))
    print(f"{name:{width}}{early:>11,.0f} µs{late:>13,.0f} µs{mean:>7,.0f} µs{late / early:>11.2f}×")
    return early, late, mean


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000, help="model steps, each with one tool call")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tree, alternating")
    ap.add_argument("--median", action="store_true",
                    help="show the median of the runs (default: the least disturbed run, each figure its minimum)")
    ap.add_argument("--baseline", default="2a6b4c3",
                    help="commit to compare with (main when issue 14 measured 13.3 ms a step, before its work)")
    ap.add_argument("--no-baseline", action="store_true", help="measure this tree only")
    ap.add_argument("--profile", nargs="?", const="cumulative", choices=["cumulative", "tottime"],
                    help="also print a cProfile top-10 of this tree's run (sorted by cumulative or own time)")
    ap.add_argument("--full", action="store_true",
                    help="also measure this tree with durability='full' (an fsync per commit): its cost")
    ap.add_argument("--durability", default=None, help=argparse.SUPPRESS)  # a child's
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # a child: one run, JSON out
    ap.add_argument("--tree", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 2 * NEAR + 11:
        ap.error(f"--steps must be at least {2 * NEAR + 11}")

    if args.measure:
        if args.tree is not None:
            _use_tree(args.tree)
        print(json.dumps(measure(args.steps, args.profile, args.durability)))
        return 0

    rows: dict[str, list[dict]] = {"this": [], "base": [], "full": []}
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        this = lay_out(ROOT, Path(tmp) / "this")  # the working tree as it is, changes included
        base = None if args.no_baseline else lay_out(checkout(args.baseline, Path(tmp) / "src"), Path(tmp) / "base")
        for _ in range(args.repeat):
            rows["this"].append(run_child(args.steps, this))
            if base is not None:
                rows["base"].append(run_child(args.steps, base))
            if args.full:
                rows["full"].append(run_child(args.steps, this, durability="full"))
        profiled = run_child(args.steps, this, args.profile) if args.profile else None

    first = rows["this"][0]
    print(f"per-step harness overhead: a {first['steps']:,}-step scripted session ({first['events']:,} events: "
          f"one model call and one `add` call a step), SQLite file in a temp dir, {args.repeat} run(s) per tree "
          f"({'medians' if args.median else 'each figure the minimum over the runs'}), the scripted model's own "
          f"time taken out; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end")
    names = {"this": f"this tree ({describe_head()})", "base": f"baseline {args.baseline}",
             "full": "this tree, durability=full"}
    width = max(len(n) for n in names.values()) + 2
    for clock, title in (("cpu", "CPU time (process, all threads)"), ("wall", "wall time")):
        print(f"\n{title:{width}}{'near step 10':>14}{f'near step {args.steps}':>16}{'mean':>10}{'last/first':>12}")
        pick = statistics.median if args.median else min
        this = _line(names["this"], rows["this"], clock, width, pick)
        if rows["full"]:
            _line(names["full"], rows["full"], clock, width, pick)
        if rows["base"]:
            was = _line(names["base"], rows["base"], clock, width, pick)
            print(f"{'baseline / this tree':{width}}"
                  + "".join(f"{w / t:>{n}.1f}×" for w, t, n in zip(was, this, (13, 15, 9))))
    print()
    for name, runs in rows.items():
        if runs:
            m = [statistics.median(r["cpu"][k] for r in runs) for k in ("model_early", "model_late")]
            print(f"{names[name].split(' (')[0]} measured from {runs[0]['fsm']} "
                  f"(session {runs[0]['status']}); the model's own CPU time taken out: {m[0]:,.0f} µs near step 10, "
                  f"{m[1]:,.0f} µs near step {args.steps}")
    if profiled is not None:
        print(f"\ncProfile of this tree's run ({args.profile}), top 10:")
        print(profiled["profile"].strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
