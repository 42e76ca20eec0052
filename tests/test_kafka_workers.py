"""Workers as separate processes over a real broker (Tansu): `loopstream worker`, `submit`,
`show`, the goal contract, and a worker SIGKILLed mid-run.

Every test uses its own topic prefix (`kafka://…?prefix=NAME`), so topics and consumer
groups never mix between tests on the session-scoped broker. Consumer timeouts are small
(Tansu answers a JoinGroup after about half of session.timeout.ms), and each group has
one member at a time.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("confluent_kafka", reason="needs confluent-kafka")

from confluent_kafka import Consumer, Producer, TopicPartition

from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from loopstream.kafka.contract import Goal, decode_update, encode_goal, session_id_for
from loopstream.kafka.log import KafkaLog
from loopstream.kafka.roles import WorkerOptions, open_role
from loopstream.processors.model import ModelProcessor
from loopstream.providers.errors import ProviderConfigError
from loopstream.providers.factory import make_provider
from loopstream.providers.scripted import scripted_from_spec
from loopstream.runtime.assembly import build_runtime, rate_limits
from tests.test_worker import check_session

pytestmark = pytest.mark.kafka
FAST = "session.timeout.ms=2000&heartbeat.interval.ms=500&fetch.wait.max.ms=20"


def bus_url(broker: str, prefix: str) -> str:
    return f"kafka://{broker}?prefix={prefix}&{FAST}"


def env_for(cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPSTREAM_", "OPENAI_", "ANTHROPIC_"))}
    env["LOOPSTREAM_DB"] = str(cwd / ".loopstream" / "loopstream.db")
    return env


def cli(*args: str, cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loopstream.cli.app", *args], cwd=cwd, env=env_for(cwd),
                          capture_output=True, text=True, timeout=timeout)


class Workers:
    """Worker processes, each stopped by its own pid at the end."""

    def __init__(self, bus: str, cwd: Path) -> None:
        self.bus, self.cwd = bus, cwd
        self.procs: dict[str, subprocess.Popen] = {}
        self.log_files: dict[str, Path] = {}
        self.n = 0

    def start(self, role: str, *extra: str, model: str | None = "adder:2") -> subprocess.Popen:
        """`model`: the scripted model the role is given (None: no --provider/--model)."""
        self.n += 1
        out = open(self.cwd / f"{role}.{self.n}.log", "wb")
        given = ["--provider", "scripted", "--model", model] if model else []
        proc = subprocess.Popen(
            [sys.executable, "-m", "loopstream.cli.app", "worker", "--role", role, "--bus", self.bus,
             *given, "-q", *extra],
            cwd=self.cwd, env=env_for(self.cwd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        out.close()
        self.procs[role] = proc
        self.log_files[role] = self.cwd / f"{role}.{self.n}.log"
        return proc

    def wait_ready(self, role: str, timeout: float = 60) -> None:
        """Until the role's latest process says it runs (its `worker GROUP: …` line)."""
        deadline = time.monotonic() + timeout
        while "worker " not in self.log_files[role].read_text(errors="replace"):
            assert self.procs[role].poll() is None, self.logs()
            assert time.monotonic() < deadline, self.logs()
            time.sleep(0.05)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.cwd.glob("*.log")))

    def stop(self, role: str) -> int:
        proc = self.procs.pop(role)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=20)

    def stop_all(self) -> dict[str, int | None]:
        codes = {}
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for role, proc in self.procs.items():
            try:
                codes[role] = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[role] = proc.wait(timeout=5)
        return codes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError as exc:  # not listening yet
        return 0, str(exc)


def samples(text: str, name: str) -> dict[str, float]:
    """{labels: value} of the metric `name` in a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line[len(name):].rpartition(" ")
            out[labels] = float(value)
    return out


def stuck(broker: str, prefix: str, sids: set[str], results: list) -> str:
    """Where the sessions without a result stand (for a failure message)."""
    done = {u.session_id for u in results if u.kind == "result"}
    lines = []
    with KafkaLog(broker, topic=f"{prefix}.events") as log:
        for sid in sorted(sids - done):
            events = log.read(sid)
            lines.append(f"{sid}: {[(e.seq, e.type) for e in events[-3:]]}")
        lines.append(f"dropped: {log.dropped()}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def all_worker(kafka_broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Workers]]:
    cwd = tmp_path_factory.mktemp("all")
    bus = bus_url(kafka_broker, "wa" + uuid.uuid4().hex[:6])
    workers = Workers(bus, cwd)
    workers.metrics_port = free_port()
    workers.start("all", "--metrics-port", str(workers.metrics_port))
    try:
        yield bus, cwd, workers
    finally:
        workers.stop_all()


def test_worker_all_submit_wait_and_show(all_worker) -> None:
    bus, cwd, workers = all_worker
    t = time.monotonic()
    r = cli("submit", "--bus", bus, "--wait", "--timeout", "60", "count to two", cwd=cwd)
    assert r.returncode == 0, r.stderr + workers.logs()
    assert r.stdout.strip() == "The result is 2."
    sid = r.stderr.split("session")[-1].split()[0]
    print(f"submit --wait: {time.monotonic() - t:.1f}s")
    shown = cli("show", "--bus", bus, sid[:8], cwd=cwd)
    assert shown.returncode == 0, shown.stderr
    for typ in ("SessionStarted", "GoalReceived", "ModelRequested", "ModelResponded", "ToolRequested",
                "ToolCompleted", "SessionFinished"):
        assert typ in shown.stdout
    assert "goal-intake" in shown.stdout and "orchestrator" in shown.stdout
    listing = cli("sessions", "--bus", bus, cwd=cwd)
    assert sid in listing.stdout and "done" in listing.stdout


def test_the_worker_serves_health_and_metrics(all_worker) -> None:
    """Scrape the real endpoint of a real worker: health, readiness, handler latency by actor,
    events appended by type, lag per group and partition, sessions by state."""
    bus, cwd, workers = all_worker
    port, prefix = workers.metrics_port, bus.split("prefix=")[1].split("&")[0]
    deadline = time.monotonic() + 30
    while scrape(port, "/readyz")[0] != 200:
        assert time.monotonic() < deadline, workers.logs()
        time.sleep(0.1)
    assert scrape(port, "/healthz") == (200, "ok\n")
    r = cli("submit", "--bus", bus, "--wait", "--timeout", "60", "count to two", cwd=cwd)
    assert r.returncode == 0, r.stderr + workers.logs()
    status, text = scrape(port, "/metrics")
    assert status == 200
    handled = samples(text, "loopstream_handler_seconds_count")
    assert handled['{actor="model",outcome="ok",role="all"}'] >= 2
    assert handled['{actor="tools",outcome="ok",role="all"}'] >= 1
    appended = samples(text, "loopstream_events_appended_total")
    assert appended['{role="all",type="SessionFinished"}'] >= 1 and appended['{role="all",type="GoalReceived"}'] >= 1
    assert samples(text, "loopstream_sessions")['{state="done"}'] >= 1
    assert samples(text, "loopstream_in_flight")['{actor="model",role="all"}'] == 0
    lag = samples(text, "loopstream_consumer_lag")
    groups = {k.split('group="')[1].split('"')[0] for k in lag}
    assert groups == {f"{prefix}.all", f"{prefix}.intake"}, lag
    assert {k.split('partition="')[1].split('"')[0] for k in lag} == {"0", "1", "2"}
    assert all(v >= 0 for v in lag.values())
    assert samples(text, "loopstream_ready") == {'{role="all"}': 1.0}
    assert scrape(port, "/nope")[0] == 404


def test_example_client_without_loopstream(all_worker, kafka_broker: str) -> None:
    """examples/produce_goal.py: plain confluent-kafka + fastavro, progress and result."""
    bus, cwd, workers = all_worker
    prefix = bus.split("prefix=")[1].split("&")[0]
    example = Path(__file__).resolve().parents[1] / "examples" / "produce_goal.py"
    tree = ast.parse(example.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.startswith("loopstream") for m in imported), imported
    r = subprocess.run([sys.executable, "-I", str(example), "--bootstrap", kafka_broker, "--prefix", prefix,
                        "--progress", "--timeout", "60", "add one twice"],
                       cwd=cwd, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr + workers.logs()
    assert r.stdout.strip() == "The result is 2."
    assert "ToolCompleted" in r.stderr and "ModelResponded" in r.stderr  # progress updates


def test_repeated_idempotency_key_starts_nothing_new(all_worker, kafka_broker: str) -> None:
    bus, cwd, workers = all_worker
    key = "order-" + uuid.uuid4().hex[:8]
    first = cli("submit", "--bus", bus, "--wait", "--timeout", "60", "--idempotency-key", key, "count", cwd=cwd)
    assert first.returncode == 0, first.stderr + workers.logs()
    # The same key again: no second session; the finished session's result answers it.
    again = cli("submit", "--bus", bus, "--wait", "--timeout", "60", "--idempotency-key", key,
                "count something else", cwd=cwd)
    assert again.returncode == 0, again.stderr + workers.logs()
    assert again.stdout == first.stdout
    sid = session_id_for(key)
    assert sid in first.stderr and sid in again.stderr
    prefix = bus.split("prefix=")[1].split("&")[0]
    with KafkaLog(kafka_broker, topic=f"{prefix}.events") as log:
        events = log.read(sid)
        assert [e.type for e in events].count("GoalReceived") == 1
        assert [e.type for e in events].count("SessionFinished") == 1
        assert events[1].payload.text == "count"
        assert sum(s.session_id == sid for s in log.sessions()) == 1
    check = cli("submit", "--bus", bus, "--idempotency-key", key, "x", cwd=cwd)
    assert check.returncode == 0 and check.stdout.strip() == sid


def test_roles_many_sessions_one_worker_killed(kafka_broker: str, tmp_path: Path) -> None:
    """orchestrator / model / tool as three processes, 20 goals through the goals topic; the
    model worker, then the orchestrator (goal intake + results publisher), SIGKILLed mid-run
    and started again."""
    started = time.monotonic()
    prefix = "wb" + uuid.uuid4().hex[:6]
    bus = bus_url(kafka_broker, prefix)
    workers = Workers(bus, tmp_path)
    n = 20
    keys = [f"job-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    sids = {session_id_for(k) for k in keys}
    results: list = []
    consumer = None
    try:
        for role in ("orchestrator", "model", "tool"):
            workers.start(role)
        producer = Producer({"bootstrap.servers": kafka_broker, "enable.idempotence": True})
        for k in keys:
            producer.produce(f"{prefix}.goals", key=k.encode(),
                             value=encode_goal(Goal(goal=f"count ({k})", idempotency_key=k)))
        assert producer.flush(30) == 0

        # The results topic exists once the orchestrator's publisher or intake created it.
        consumer = Consumer({"bootstrap.servers": kafka_broker, "group.id": f"test-{prefix}",
                             "enable.auto.commit": False, "auto.offset.reset": "earliest",
                             "topic.metadata.refresh.interval.ms": 500})
        deadline = time.monotonic() + 90

        def collect(until) -> None:
            while not until():
                assert time.monotonic() < deadline, (
                    f"{len(results)} results\n{workers.logs()}\n{stuck(kafka_broker, prefix, sids, results)}")
                m = consumer.poll(0.2)
                if m is not None and m.error() is None:
                    results.append(decode_update(m.value()))

        def wait_for_topic() -> None:
            while True:
                md = consumer.list_topics(f"{prefix}.results", timeout=10).topics.get(f"{prefix}.results")
                if md is not None and md.error is None and md.partitions:
                    consumer.assign([TopicPartition(f"{prefix}.results", p, 0) for p in md.partitions])
                    return
                assert time.monotonic() < deadline, workers.logs()
                time.sleep(0.2)

        wait_for_topic()
        kills = []
        for role, after in (("model", 3), ("orchestrator", 8)):
            collect(lambda after=after: len({u.session_id for u in results}) >= after)
            kills.append(f"{role} after {len({u.session_id for u in results})} results")
            workers.procs[role].send_signal(signal.SIGKILL)
            workers.procs[role].wait(10)
            workers.start(role)
            workers.wait_ready(role)  # the other roles may finish every session meanwhile
        collect(lambda: {u.session_id for u in results if u.kind == "result"} >= sids)
        print(f"SIGKILLed and restarted: {', '.join(kills)}; all {n} done "
              f"{time.monotonic() - started:.1f}s after start")
    finally:
        if consumer is not None:
            consumer.close()
        codes = workers.stop_all()
    assert all(c == 0 for c in codes.values() if c is not None), (codes, workers.logs())

    # One result per session after deduplication by (session_id, seq); count the repeats.
    mine = [u for u in results if u.session_id in sids and u.kind == "result"]
    by_key = Counter(u.dedupe_key for u in mine)
    assert len(by_key) == n and {u.status for u in mine} == {"done"}
    assert {sid for sid, _ in by_key} == sids
    print(f"result records: {len(mine)} for {n} sessions ({len(mine) - n} redelivered duplicates)")

    with KafkaLog(kafka_broker, topic=f"{prefix}.events") as log:
        for sid in sids:
            events = log.read(sid)
            check_session(log, sid)
            state = fold(events)
            assert state.status == "done" and state.answer == "The result is 2.", sid
            assert [e.type for e in events].count("SessionStarted") == 1
        print(f"records the acceptance rule dropped: {Counter(d['reason'] for d in log.dropped())}")


def test_the_tool_worker_reviews_with_its_own_model_and_fails_closed_without_one(
        kafka_broker: str, tmp_path: Path) -> None:
    """Sessions whose guardrails ask for review: the tool role reviews each call with the
    model it was given (`reviewer:0` blocks, `reviewer` allows); without one it blocks."""
    bus = bus_url(kafka_broker, "rv" + uuid.uuid4().hex[:6])
    agents = tmp_path / "agents.json"
    agents.write_text(json.dumps({"reviewed": {"tools": ["add"], "policy": {
        "guardrails": {"review_tool_calls": True, "on_tool_call": "stop"}}}}))
    workers = Workers(bus, tmp_path)

    def submit() -> subprocess.CompletedProcess:
        return cli("submit", "--bus", bus, "--wait", "--timeout", "90", "--agent", "reviewed",
                   "--idempotency-key", uuid.uuid4().hex, "count to two", cwd=tmp_path, timeout=120)

    try:
        workers.start("orchestrator", "--agents", str(agents))
        workers.start("model")
        workers.start("tool", model="reviewer:0")
        blocked = submit()
        assert blocked.returncode == 1, (blocked.stdout, blocked.stderr, workers.logs())
        assert "scripted reviewer blocks every call" in blocked.stdout + blocked.stderr

        assert workers.stop("tool") == 0
        workers.start("tool", model=None)
        unreviewed = submit()
        assert unreviewed.returncode == 1, (unreviewed.stdout, unreviewed.stderr, workers.logs())
        assert "no reviewer model" in unreviewed.stdout + unreviewed.stderr

        assert workers.stop("tool") == 0
        workers.start("tool", model="reviewer")
        allowed = submit()
        assert allowed.returncode == 0 and allowed.stdout.strip() == "The result is 2.", (
            allowed.stdout, allowed.stderr, workers.logs())
    finally:
        codes = workers.stop_all()
    assert all(c == 0 for c in codes.values()), (codes, workers.logs())


def test_a_model_worker_switches_to_its_fallback_model_when_the_first_keeps_failing(
        kafka_broker: str, tmp_path: Path) -> None:
    """`worker --fallback-model` (and --rpm/--tpm) as for `run`: the model keeps failing
    (retryable), the orchestrator falls back to the model both roles were given, and the
    model worker answers with it."""
    prefix = "fb" + uuid.uuid4().hex[:6]
    bus = bus_url(kafka_broker, prefix)
    workers = Workers(bus, tmp_path)
    models = ["--fallback-model", "scripted:adder:2"]
    key = "fb-" + uuid.uuid4().hex[:8]
    try:
        workers.start("orchestrator", *models, model="scripted:down")
        workers.start("model", *models, "--rpm", "600", "--tpm", "100000", model="scripted:down")
        workers.start("tool")
        r = cli("submit", "--bus", bus, "--wait", "--timeout", "90", "--idempotency-key", key, "count to two",
                cwd=tmp_path, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "The result is 2.", (r.stdout, r.stderr, workers.logs())
    finally:
        codes = workers.stop_all()
    assert all(c == 0 for c in codes.values()), (codes, workers.logs())
    with KafkaLog(kafka_broker, topic=f"{prefix}.events") as log:
        events = log.read(session_id_for(key))
    types = [e.type for e in events]
    assert types.count("ModelFailed") == 3 and types.count("RetryScheduled") == 2, types  # 3 attempts, then switch
    (fallback,) = [e.payload for e in events if e.type == "ModelFallback"]
    assert (fallback.from_model, fallback.to_model) == ("scripted:down", "scripted:adder:2")
    assert "the scripted model is down" in fallback.reason
    assert {e.payload.model for e in events if e.type == "ModelResponded"} == {"scripted:adder:2"}
    assert json.loads(events[0].payload.config_json)["fallback_models"] == ["scripted:adder:2"]  # SessionStarted


def test_the_model_role_and_run_build_the_same_processors(tmp_path: Path) -> None:
    """The worker roles and the in-process agent come from one assembly function: the role
    `all` given run's model options has the processors `build_runtime` has, with the same
    fallbacks and rate limits."""
    opts = WorkerOptions(role="all", bus=f"sqlite:///{tmp_path / 'w.db'}", provider="scripted", model="down",
                         fallback_models=("scripted:adder:2",), rpm=60, tpm=5000)
    with open_role(opts) as (worker, _):
        role = worker.processors
    primary, backup = scripted_from_spec("down"), scripted_from_spec("adder:2")
    with SQLiteLog(tmp_path / "r.db") as log:
        inline = build_runtime(log, primary, fallbacks=[backup],
                               limits=rate_limits([primary, backup], 60, 5000)).processors
    # the same processors (observers aside: the worker's child watcher, docs/subagents.md), where the
    # in-process child runner stands for the worker's child coordinator: both act for `children`
    assert [p.name for p in role if getattr(p, "acts_for", None)] == [p.name for p in inline]
    (model,) = [p for p in role if isinstance(p, ModelProcessor)]
    assert model.provider.model == "scripted:down" and list(model.by_model) == ["scripted:adder:2"]
    (limiter,) = model.limits.values()
    assert list(model.limits) == ["scripted"]
    assert (limiter.requests.capacity, limiter.tokens.capacity) == (60, 5000)


def readme_worker_args(role: str) -> list[str]:
    """The arguments of the README's `loopstream worker --role ROLE …` command."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if ln.startswith(f"loopstream worker --role {role} ")]
    return shlex.split(line.split("#")[0].strip().rstrip("&"))[2:]


def test_the_readme_model_worker_needs_no_api_key(kafka_broker: str, tmp_path: Path) -> None:
    """The README's model worker, with no key in the environment, chooses the keyless local
    model as `run` does (one code path: providers/factory.py); where the [local] extra is
    missing it exits with one line saying how to install it, not asking for a key."""
    args = readme_worker_args("model")
    assert "--model" not in args and "--provider" not in args, args
    try:
        chosen, _server = make_provider(env={})  # not entered: the local server is not started
    except ProviderConfigError as exc:
        assert importlib.util.find_spec("xllamacpp") is None and "keyless local model" in str(exc)
    else:
        assert chosen.name == "local"
    if importlib.util.find_spec("xllamacpp") is not None:
        return  # serving on the real local model: tests/test_e2e_local.py (marker `local`)
    args[args.index("--bus") + 1] = bus_url(kafka_broker, "rm" + uuid.uuid4().hex[:6])
    r = cli("worker", *args, cwd=tmp_path, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert "keyless local model" in r.stderr and "needs OPENAI_API_KEY" not in r.stderr, r.stderr


def test_show_and_sessions_report_the_model_that_answered(kafka_broker: str, tmp_path: Path) -> None:
    """An orchestrator given no model starts sessions before any model worker is known: its
    SessionStarted says `provider=any model=default` (whichever model worker takes the steps);
    `show` and `sessions` report the model that answered, from the ModelResponded events."""
    prefix = "ma" + uuid.uuid4().hex[:6]
    bus = bus_url(kafka_broker, prefix)
    workers = Workers(bus, tmp_path)
    key = "ma-" + uuid.uuid4().hex[:8]
    try:
        workers.start("orchestrator", model=None)
        workers.start("model", model="adder:2")
        workers.start("tool", model=None)
        r = cli("submit", "--bus", bus, "--wait", "--timeout", "90", "--idempotency-key", key, "count to two",
                cwd=tmp_path, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "The result is 2.", (r.stdout, r.stderr, workers.logs())
    finally:
        codes = workers.stop_all()
    assert all(c == 0 for c in codes.values()), (codes, workers.logs())
    sid = session_id_for(key)
    shown = cli("show", sid, "--bus", bus, "--width", "400", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "provider=any model=default" in shown.stdout  # what the orchestrator knew, as recorded
    assert shown.stdout.splitlines()[1] == "answered by scripted:adder:2", shown.stdout
    listing = cli("sessions", "--bus", bus, cwd=tmp_path)
    rows = [line.split() for line in listing.stdout.splitlines() if sid in line]
    assert len(rows) == 1, listing.stdout
    row = rows[0]
    assert row[:6] == [sid, *row[1:3], "done", row[4], "scripted:adder:2"], listing.stdout
