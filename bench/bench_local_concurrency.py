"""N concurrent `loopstream run` on the local model: one shared llama.cpp server vs one per run.

    python bench/bench_local_concurrency.py [--n 1,3,5] [--modes own,shared] [--goal TEXT]

For each N and mode, starts N `loopstream run -q GOAL` at once (each in its own directory
and log) and prints the wall time of each run and of all, how many answered, and the peak
memory while they ran: RSS and PSS (proportional: shared pages such as the mmapped weights
counted once) of the llama.cpp server processes and of everything (runs + servers).
  own     LOOPSTREAM_LOCAL_SHARED=0: every run loads the model in its own process
  shared  the default: the first run starts the shared server, the others reuse it
Each configuration gets a fresh cache dir (the verified model linked in), so the shared
server starts cold every time and is stopped after. Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from loopstream.providers.local import MODEL_FILE, default_cache_dir, ensure_local_model

GOAL = "What is 40213 + 1999? Use the add tool."  # the README's example
SUPERVISOR = b"loopstream.providers.local_supervisor"


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in kB, (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    values = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines()[1:] if line.endswith("kB")}
    return values.get("Rss", 0), values.get("Pss", 0)


def maps_model(pid: int) -> bool:
    try:
        return MODEL_FILE in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def supervisors(cache: Path) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if SUPERVISOR in argv and str(cache).encode() in argv:
                out.append(int(entry.name))
    return out


@dataclass
class Peak:
    """The highest memory seen, sampled every 0.2 s: servers alone, and servers + runs."""

    server_rss: int = 0
    server_pss: int = 0
    all_rss: int = 0
    all_pss: int = 0
    servers_seen: set[int] = field(default_factory=set)

    def sample(self, runs: list[int], cache: Path) -> None:
        servers = [p for p in set(runs) | set(supervisors(cache)) if maps_model(p)]
        self.servers_seen |= set(servers)
        mem = {p: memory_kb(p) for p in set(runs) | set(servers)}
        self.server_rss = max(self.server_rss, sum(mem[p][0] for p in servers))
        self.server_pss = max(self.server_pss, sum(mem[p][1] for p in servers))
        self.all_rss = max(self.all_rss, sum(r for r, _ in mem.values()))
        self.all_pss = max(self.all_pss, sum(p for _, p in mem.values()))


def fresh_cache(root: Path) -> Path:
    real = ensure_local_model(default_cache_dir())
    cache = root / "cache"
    cache.mkdir()
    (cache / MODEL_FILE).symlink_to(real)
    (cache / f"{MODEL_FILE}.sha256").write_text(real.with_name(f"{MODEL_FILE}.sha256").read_text())
    return cache


def configuration(n: int, mode: str, goal: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-local-") as tmp:
        root = Path(tmp)
        cache = fresh_cache(root)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPSTREAM_", "OPENAI_", "ANTHROPIC_"))}
        env.update(LOOPSTREAM_CACHE_DIR=str(cache), LOOPSTREAM_LOCAL_IDLE_SECONDS="600",
                   LOOPSTREAM_LOCAL_SHARED="1" if mode == "shared" else "0")
        peak, done = Peak(), threading.Event()
        started = time.monotonic()
        runs, ends = [], {}
        for i in range(n):
            (root / f"run{i}").mkdir()
            runs.append(subprocess.Popen([sys.executable, "-m", "loopstream.cli.app", "run", "-q", goal],
                                         cwd=root / f"run{i}", env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))

        def watch() -> None:
            while not done.is_set():
                peak.sample([r.pid for r in runs], cache)
                for i, r in enumerate(runs):
                    if i not in ends and r.poll() is not None:
                        ends[i] = time.monotonic() - started
                done.wait(0.2)

        sampler = threading.Thread(target=watch, daemon=True)
        sampler.start()
        outputs = []
        for r in runs:
            try:
                outputs.append(r.communicate(timeout=max(1.0, timeout - (time.monotonic() - started)))[0])
            except subprocess.TimeoutExpired:
                r.kill()
                outputs.append(r.communicate()[0])
        total = time.monotonic() - started
        done.set()
        sampler.join()
        for i, r in enumerate(runs):
            ends.setdefault(i, total)
        for pid in supervisors(cache):  # the shared server this configuration started
            os.kill(pid, signal.SIGTERM)
        answered = sum(1 for r, out in zip(runs, outputs, strict=True) if r.returncode == 0 and "42212" in out)
        return {"mode": mode, "n": n, "each": [ends[i] for i in range(n)], "total": total, "answered": answered,
                "servers": len(peak.servers_seen), "peak": peak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="1,3,5", help="numbers of concurrent runs")
    ap.add_argument("--modes", default="own,shared", help="own (LOOPSTREAM_LOCAL_SHARED=0) and/or shared")
    ap.add_argument("--goal", default=GOAL)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds for one configuration")
    args = ap.parse_args()
    print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start; goal {args.goal!r}")
    header = (f"{'mode':<7} {'N':>2} {'wall s per run':<32} {'all s':>7} {'ok':>4} {'servers':>7} "
              f"{'peak RSS MB servers/all':>24} {'peak PSS MB servers/all':>24}")
    print(header)
    print("-" * len(header))
    for n in [int(x) for x in args.n.split(",")]:
        for mode in args.modes.split(","):
            r = configuration(n, mode, args.goal, args.timeout)
            p = r["peak"]
            each = " ".join(f"{s:.0f}" for s in r["each"])
            print(f"{mode:<7} {n:>2} {each:<32} {r['total']:>7.1f} {r['answered']:>2}/{n} {r['servers']:>7} "
                  f"{p.server_rss / 1024:>11.0f} / {p.all_rss / 1024:<10.0f} {p.server_pss / 1024:>11.0f} / "
                  f"{p.all_pss / 1024:<10.0f}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end (other work on the machine slows every figure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
