"""The driver conformance suite (tests/driver_conformance.py) against each driver:

- `TestInlineSQLite`: the inline driver (`Runtime`, assembled by `build_runtime` as
  `loopstream run` does) over a SQLite file;
- `TestWorkerRolesSQLite` / `TestWorkerAllSQLite`: `Worker`s with the processors of
  `processors_for`, as `loopstream worker --role R` runs them (orchestrator, model and tool
  as three workers with their own groups and log handles, or one worker of role `all`),
  in threads of this process, over a SQLite file;
- `TestWorkerRolesKafka`: the three role workers over `KafkaLog` on a real broker (Tansu).

The adapters below are the only code here that knows a driver's API. Where a driver
behaves differently today, the case is an `xfail(strict=True)` naming the difference.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import pytest

from loopstream.core import events as ev
from loopstream.core.log import Log
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import SessionState, fold, open_work
from loopstream.runtime.assembly import build_runtime, processors_for
from loopstream.runtime.inline import Runtime, SessionConfig
from loopstream.runtime.worker import Worker
from loopstream.tools.builtin import default_registry

pytest.register_assert_rewrite("tests.driver_conformance")  # its asserts show their values

from tests.driver_conformance import (  # noqa: E402
    Agent,
    DriverConformance,
    DriverHarness,
    Harness,
    Opened,
    comparable,
    run_deterministic,
)

try:
    from loopstream.kafka.log import KafkaLog
except ImportError:  # no confluent-kafka: the Kafka tests skip (their kafka_broker fixture does)
    KafkaLog = None

Opener = Callable[[], Log]


class Interrupted(Exception):
    """Raised from the inline driver's event callback: the process 'dies' after an append."""


def record_elsewhere(opener: Opener, session_id: str, payloads: Sequence[ev.Payload], actor: str,
                     key: str) -> SessionState:
    """A decision written through a second log handle, as `loopstream approve` does."""
    other = opener()
    try:
        return Runtime(other, []).record(session_id, payloads, actor=actor, key=key)
    finally:
        other.close()


# -- the inline driver --------------------------------------------------------------------------
class InlineDriver:
    """`loopstream run`: build_runtime(log, model, registry, fallbacks=…, limits=…) over its
    own log handle, driven in the caller's thread; it returns when the session ends or waits
    for a person. `log` is a second handle, the scenario's."""

    def __init__(self, opener: Opener, agent: Agent) -> None:
        self.opener, self.agent = opener, agent
        self.log = opener()
        self._left: int | None = None  # events until interrupt_after stops the driver
        self._driver_log: Log | None = None
        self.restart()

    def _seen(self, event: ev.Event) -> None:
        if self._left is not None:
            self._left -= 1
            if self._left == 0:
                raise Interrupted

    def start(self, goal: str, config: SessionConfig, *, idempotency_key: str | None = None) -> str:
        return self.runtime.start_session(goal, config, idempotency_key=idempotency_key)

    def run_until_settled(self, session_id: str, timeout: float = 30.0) -> SessionState:
        assert self._driver_log is not None, "the driver was stopped: restart() first"
        return self.runtime.run_session(session_id)

    def interrupt_after(self, session_id: str, events: int, timeout: float = 30.0) -> SessionState:
        self._left = events
        try:
            self.runtime.run_session(session_id)
        except Interrupted:
            pass
        finally:
            self._left = None
            self.stop()
        return fold(self.log.read(session_id))

    def record(self, session_id: str, payloads: Sequence[ev.Payload], actor: str, key: str = "") -> SessionState:
        return record_elsewhere(self.opener, session_id, payloads, actor, key)

    def stop(self) -> None:
        if self._driver_log is not None:
            self._driver_log.close()
            self._driver_log = None

    def restart(self) -> None:
        self.stop()
        a = self.agent
        self._driver_log = self.opener()
        limits = {p.name: a.limiter for p in [a.provider, *a.fallbacks]} if a.limiter else None
        self.runtime = build_runtime(self._driver_log, a.provider, default_registry().add(*a.tools),
                                     on_event=self._seen, fallbacks=a.fallbacks, limits=limits)

    def close(self) -> None:
        self.stop()
        self.log.close()


# -- the worker -----------------------------------------------------------------------------------
def settled(state: SessionState) -> bool:
    """Ended, or waiting for a person with nothing owed and no clock to wait on."""
    return state.terminal or (not open_work(state) and state.wake_at_ms is None)


class WorkerDriver:
    """`loopstream worker --role R` for each of `roles`: a Worker with processors_for(R), its own
    consumer group and log handle, running in a thread of this process until stopped.

    Built as kafka/roles.py `open_role` builds it: processors_for(R) with the model (and its
    fallbacks and rate limiter: `loopstream worker --fallback-model/--rpm/--tpm`) and the
    scenario's tools as the registry."""

    def __init__(self, opener: Opener, agent: Agent, roles: Sequence[str], group_prefix: str) -> None:
        self.opener, self.agent, self.roles, self.prefix = opener, agent, tuple(roles), group_prefix
        self.log = opener()
        self.workers: list[Worker] = []
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._left: tuple[str, int] | None = None  # (session, events) until interrupt_after stops the workers
        self._interrupted = threading.Event()
        self._start_workers()  # long-running, as deployed

    # -- the workers ---------------------------------------------------------------------------
    def _processors(self, role: str) -> list:
        a = self.agent
        limits = {p.name: a.limiter for p in [a.provider, *a.fallbacks]} if a.limiter else None
        return processors_for(role, provider=a.provider, registry=default_registry().add(*a.tools),
                              fallbacks=a.fallbacks, limits=limits)

    def _start_workers(self) -> None:
        for role in self.roles:
            worker = Worker(self.opener(), self._processors(role), f"{self.prefix}.{role}", on_event=self._seen)
            thread = threading.Thread(target=self._run, args=(worker,), name=f"driver-{role}", daemon=True)
            self.workers.append(worker)
            self.threads.append(thread)
            thread.start()
        self._wait_joined()

    def _wait_joined(self, timeout: float = 30.0) -> None:
        """Until every worker is in its group (it had a delivery). On Tansu, a consumer that
        leaves while its first JoinGroup is pending stays in the group as its leader, and the
        next member waits in SyncGroup for ever: so the driver is up, and may be stopped, only
        once each worker has joined. The deliveries come from a session of its own that the
        orchestrator ends at once (its goal is blocked by an input guardrail): no model call."""
        Runtime(self.log, []).start_session("warm-up", SessionConfig(
            provider="none", model="none", tools=[], extra={"guardrails": {"input_deny": ["warm-up"]}}))
        deadline = time.monotonic() + timeout
        while not all(w.stats.snapshot().get("delivered", 0) for w in self.workers):
            assert not self.errors, f"a worker died: {self.errors!r}"
            assert time.monotonic() < deadline, f"the workers did not join in {timeout}s: {self._stats()}"
            time.sleep(0.02)

    def _run(self, worker: Worker) -> None:
        try:
            worker.run()
        except BaseException as exc:  # reported by run_until_settled
            self.errors.append(exc)
        finally:
            worker.log.close()

    def _stop_workers(self) -> None:
        for w in self.workers:
            w.stop()
        for t in self.threads:
            t.join(30)
            assert not t.is_alive(), f"{t.name} did not stop"
        self.workers, self.threads = [], []

    def _seen(self, event: ev.Event) -> None:
        with self._lock:
            if self._left is None or self._left[0] != event.session_id:
                return
            self._left = (event.session_id, self._left[1] - 1)
            if self._left[1] == 0:
                self._interrupted.set()
                for w in self.workers:
                    w.stop()

    def _stats(self) -> str:
        return "; ".join(f"{w.group}: {w.stats.snapshot()}" for w in self.workers)

    def _wait(self, session_id: str, done: Callable[[SessionState], bool], timeout: float) -> SessionState:
        deadline = time.monotonic() + timeout
        while True:
            state = fold(self.log.read(session_id))
            if done(state):
                return state
            assert not self.errors, f"a worker died: {self.errors!r}"
            assert time.monotonic() < deadline, (f"session {session_id} not settled in {timeout}s: "
                                                 f"{state.status} at seq {state.seq}; {self._stats()}")
            time.sleep(0.02)

    # -- the harness ---------------------------------------------------------------------------
    def start(self, goal: str, config: SessionConfig, *, idempotency_key: str | None = None) -> str:
        return Runtime(self.log, []).start_session(goal, config, idempotency_key=idempotency_key)

    def run_until_settled(self, session_id: str, timeout: float = 30.0) -> SessionState:
        assert self.workers, "the workers were stopped: restart() first"
        return self._wait(session_id, settled, timeout)

    def interrupt_after(self, session_id: str, events: int, timeout: float = 30.0) -> SessionState:
        with self._lock:
            self._left = (session_id, events)
        try:
            self._wait(session_id, lambda s: self._interrupted.is_set() or settled(s), timeout)
            assert self._interrupted.is_set(), "the session settled before the driver was stopped"
            self._stop_workers()
        finally:
            with self._lock:
                self._left = None
        return fold(self.log.read(session_id))

    def record(self, session_id: str, payloads: Sequence[ev.Payload], actor: str, key: str = "") -> SessionState:
        return record_elsewhere(self.opener, session_id, payloads, actor, key)

    def stop(self) -> None:
        self._stop_workers()

    def restart(self) -> None:
        self._stop_workers()
        self._interrupted.clear()
        self._start_workers()

    def close(self) -> None:
        try:
            self._stop_workers()
        finally:
            self.log.close()


# -- the drivers ------------------------------------------------------------------------------------
def sqlite_opener(tmp_path: Path) -> Opener:
    return partial(SQLiteLog, tmp_path / f"{uuid.uuid4().hex[:8]}.db")


def inline_sqlite(tmp_path: Path, opened: Opened) -> Harness:
    return lambda agent: opened.add(InlineDriver(sqlite_opener(tmp_path), agent))


def workers_sqlite(tmp_path: Path, opened: Opened, roles: Sequence[str]) -> Harness:
    return lambda agent: opened.add(WorkerDriver(sqlite_opener(tmp_path), agent, roles, "conformance"))


# Tansu answers a JoinGroup after about half the session timeout: keep it short in tests.
FAST_GROUPS = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500, "fetch.wait.max.ms": 20}
ROLES = ("orchestrator", "model", "tool")


def workers_kafka(broker: str, opened: Opened) -> Harness:
    def make(agent: Agent) -> DriverHarness:
        prefix = "dc" + uuid.uuid4().hex[:10]
        opener = partial(KafkaLog, broker, topic=f"{prefix}.events", consumer_config=FAST_GROUPS)
        return opened.add(WorkerDriver(opener, agent, ROLES, prefix))
    return make


@pytest.fixture
def opened() -> Iterator[Opened]:
    o = Opened()
    yield o
    o.close()


class TestInlineSQLite(DriverConformance):
    @pytest.fixture
    def harness(self, tmp_path: Path, opened: Opened) -> Harness:
        return inline_sqlite(tmp_path, opened)


class TestWorkerRolesSQLite(DriverConformance):
    @pytest.fixture
    def harness(self, tmp_path: Path, opened: Opened) -> Harness:
        return workers_sqlite(tmp_path, opened, ROLES)


class TestWorkerAllSQLite(DriverConformance):
    @pytest.fixture
    def harness(self, tmp_path: Path, opened: Opened) -> Harness:
        return workers_sqlite(tmp_path, opened, ["all"])


@pytest.mark.kafka
class TestWorkerRolesKafka(DriverConformance):
    @pytest.fixture
    def harness(self, kafka_broker: str, opened: Opened) -> Harness:
        return workers_kafka(kafka_broker, opened)


# -- one session, the same events under every driver -----------------------------------------------
def test_inline_and_worker_drivers_write_the_same_events_on_sqlite(tmp_path: Path, opened: Opened) -> None:
    runs = [run_deterministic(h, "same-events") for h in (
        inline_sqlite(tmp_path, opened), workers_sqlite(tmp_path, opened, ROLES),
        workers_sqlite(tmp_path, opened, ["all"]))]
    assert comparable(runs[0]) == comparable(runs[1]) == comparable(runs[2])


@pytest.mark.kafka
def test_kafka_workers_write_the_same_events_as_the_inline_driver(tmp_path: Path, opened: Opened,
                                                                  kafka_broker: str) -> None:
    inline = run_deterministic(inline_sqlite(tmp_path, opened), "same-events")
    kafka = run_deterministic(workers_kafka(kafka_broker, opened), "same-events")
    assert comparable(inline) == comparable(kafka)
