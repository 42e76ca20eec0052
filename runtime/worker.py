"""A worker: processors driven by a log subscription instead of by the embedded runtime.

`Worker(log, processors, group)` subscribes to the log as consumer group `group` and, for
each delivered event, runs the processors whose `triggers` hold its type: the same plain
handlers `Runtime` uses in-process, here as an independent process over Kafka (or over
SQLite, whose `subscribe` works the same way). Several workers with different groups (an
orchestrator, a model worker, a tool worker) together drive every session.

Per delivery
------------
1. The session's state is folded to the **head of the log** (a per-session cache, folded
   incrementally from `log.read(session, cache.next_seq)`), never just up to the delivered
   event: the orchestrator decides only when the event is the head, and the model/tool
   processors skip requests that the head shows answered.
2. Each matching processor's `handle(event, state)` runs in a thread pool (`concurrency`
   threads), so a slow model or tool call of one session does not hold the other sessions
   of its partition. Deliveries of one session run one after another, in log order.
3. Emits become events with `runtime.build_events` (ids derived from the cause), checked
   against the `transitions` machine, and are appended with optimistic concurrency
   (`expected_seq = state.next_seq`). `DuplicateEvent`: someone (a redelivery, another
   member of the group) wrote this very fact already: refresh, drop. `ConcurrencyError`:
   another writer moved the session; refresh, and if the cause is still owed
   (`state.open_work`, e.g. a second tool call of the same reply), append the same emits
   after the new head (same ids, no re-execution); otherwise drop: whatever was written
   is delivered to its own handlers, and the orchestrator decides again on it.
4. A session waiting on the clock (`state.wake_at_ms`, backing off before a retry) keeps
   its delivery open and is handled again at that time, without a thread waiting.
5. Offsets: a delivery's position is committed only when it and every earlier delivery
   of its partition are finished (done, not waiting, not failing). So a crash at any
   point redelivers everything unfinished: at-least-once. Redelivery is harmless:
   deterministic ids make a repeated append a `DuplicateEvent`, the processors' "already
   answered" checks skip requests that have a result, and the orchestrator ignores any
   event that is not the head. A handler that raises is retried with backoff (its
   partition's commits wait; after `max_attempts` a handler bug is logged, skipped, and
   its session ends with a SessionFailed that names it (error_kind "internal"), while
   errors of the log or broker (`LogError`) are retried for ever).

Kafka transactions are not used to append events (why: docs/kafka.md).

Stopping: `stop()` (SIGTERM/SIGINT via `install_signal_handlers`) stops polling, lets the
running handlers finish (up to `drain_timeout`), commits what is finished and closes the
subscription; a delivery still waiting on the clock is left uncommitted and redelivered
to the next worker.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import signal
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from loopstream.core import events as ev
from loopstream.core.fsm import machine_next_state
from loopstream.core.log import (
    ConcurrencyError,
    Delivery,
    DuplicateEvent,
    Log,
    LogError,
)
from loopstream.core.processor import Emit, Processor
from loopstream.core.secrets import Secrets
from loopstream.core.state import SessionState, fold, open_work
from loopstream.runtime.inline import build_events

logger = logging.getLogger("loopstream.worker")

EventCallback = Callable[[ev.Event], None]
DONE = "done"


@dataclass
class _Job:
    delivery: Delivery
    part: Any
    offset: Any
    attempts: int = 0

    @property
    def event(self) -> ev.Event:
        return self.delivery.event


class _Partition:
    """Offsets of one partition in flight; yields the delivery to commit when a prefix is done."""

    def __init__(self) -> None:
        self.heap: list[Any] = []
        self.state: dict[Any, Delivery | None] = {}  # offset -> None while unfinished

    def add(self, offset: Any) -> bool:
        if offset in self.state:
            return False  # delivered again while in flight: the first copy will finish it
        heapq.heappush(self.heap, offset)
        self.state[offset] = None
        return True

    def finish(self, offset: Any, delivery: Delivery) -> Delivery | None:
        self.state[offset] = delivery
        last = None
        while self.heap and self.state[self.heap[0]] is not None:
            last = self.state.pop(heapq.heappop(self.heap))
        return last

    def __len__(self) -> int:
        return len(self.state)


def _split(position: Any) -> tuple[Any, Any]:
    """(partition, offset) from a backend's position: Kafka's (p, o); SQLite's global int."""
    if isinstance(position, tuple) and len(position) == 2:
        return position[0], position[1]
    return None, position


@dataclass
class WorkerStats:
    counts: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)


class Worker:
    """Run `processors` over `log` as consumer group `group` (see the module docstring)."""

    def __init__(
        self,
        log: Log,
        processors: Sequence[Processor],
        group: str,
        concurrency: int = 8,
        *,
        secrets: Secrets = (),
        on_event: EventCallback | None = None,
        poll_max: int = 200,
        poll_timeout: float = 0.2,
        max_buffered: int = 10_000,
        cache_size: int = 4096,
        drain_timeout: float = 30.0,
        retry_delays: Sequence[float] = (0.2, 0.5, 1, 2, 5, 10, 30),
        max_attempts: int = 10,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.log, self.group = log, group
        self.processors = list(processors)
        self.triggers = frozenset().union(*(p.triggers for p in self.processors)) if self.processors else frozenset()
        self.concurrency = concurrency
        self.secrets = secrets if isinstance(secrets, Mapping) else tuple(secrets)
        self.on_event = on_event
        self.poll_max, self.poll_timeout = poll_max, poll_timeout
        self.max_buffered, self.cache_size = max_buffered, cache_size
        self.drain_timeout = drain_timeout
        self.retry_delays = tuple(retry_delays)
        self.max_attempts = max_attempts
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # scheduling state below
        self._parts: dict[Any, _Partition] = {}
        self._queues: dict[str, deque[_Job]] = {}  # per session; the head job is running or waiting
        self._timers: list[tuple[float, int, _Job]] = []  # (monotonic time, tiebreak, job)
        self._ticket = itertools.count()
        self._ready: dict[Any, Delivery] = {}  # partition -> delivery to commit
        self._running = 0
        self._idle = threading.Condition(self._lock)
        self._cache: OrderedDict[str, SessionState] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    # -- control ---------------------------------------------------------------------
    def stop(self) -> None:
        """Ask `run` to stop gracefully (safe from signal handlers and other threads)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def in_flight(self) -> int:
        with self._lock:
            return sum(len(p) for p in self._parts.values())

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Poll, dispatch and commit until `stop()` (or until `until()` is true)."""
        sub = self.log.subscribe(self.group)
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"ls-{self.group}")
        try:
            while not self._stop.is_set():
                self._commit_ready(sub)
                wait = self._fire_timers()
                if until is not None and until():
                    break
                if self.in_flight() >= self.max_buffered:
                    self._stop.wait(min(0.05, wait))
                    continue
                try:
                    deliveries = sub.poll(max_events=self.poll_max, timeout=min(self.poll_timeout, wait))
                except LogError as exc:
                    logger.warning("%s: poll failed: %s", self.group, exc)
                    self._stop.wait(1.0)
                    continue
                for d in deliveries:
                    self._accept(d)
        finally:
            self._stop.set()
            self._drain()
            self._commit_ready(sub)
            self._pool.shutdown(wait=False, cancel_futures=True)
            try:
                sub.close()
            except Exception as exc:  # closing must not hide the reason we stopped
                logger.warning("%s: closing the subscription: %s", self.group, exc)

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        with self._idle:
            while self._running and time.monotonic() < deadline:
                self._idle.wait(0.1)
            if self._running:
                logger.warning("%s: %d handler(s) still running at shutdown; their deliveries "
                               "are not committed and will be redelivered", self.group, self._running)

    # -- scheduling (main thread + completions) ----------------------------------------
    def _accept(self, d: Delivery) -> None:
        part, off = _split(d.position)
        job = _Job(d, part, off)
        with self._lock:
            tracker = self._parts.setdefault(part, _Partition())
            if not tracker.add(off):
                self.stats.add("redelivered_in_flight")
                return
            self.stats.add("delivered")
            if d.event.type not in self.triggers:
                self._finish_locked(job)
                return
            q = self._queues.setdefault(d.event.session_id, deque())
            q.append(job)
            if len(q) == 1:
                self._submit_locked(job)

    def _submit_locked(self, job: _Job) -> None:
        if self._stop.is_set() or self._pool is None:
            return  # left unfinished: not committed, redelivered after a restart
        self._running += 1
        try:
            self._pool.submit(self._run_job, job)
        except RuntimeError:  # pool already shut down
            self._running -= 1

    def _finish_locked(self, job: _Job) -> None:
        ready = self._parts[job.part].finish(job.offset, job.delivery)
        if ready is not None:
            self._ready[job.part] = ready

    def _complete(self, job: _Job, outcome: str | tuple[str, float]) -> None:
        with self._lock:
            self._running -= 1
            if outcome == DONE:
                self._finish_locked(job)
                q = self._queues.get(job.event.session_id)
                if q and q[0] is job:
                    q.popleft()
                if q:
                    self._submit_locked(q[0])
                else:
                    self._queues.pop(job.event.session_id, None)
            else:
                heapq.heappush(self._timers, (outcome[1], next(self._ticket), job))
            self._idle.notify_all()

    def _fire_timers(self) -> float:
        """Resubmit due jobs; the seconds until the next timer (at most 1)."""
        now = time.monotonic()
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                _, _, job = heapq.heappop(self._timers)
                self._submit_locked(job)
            return max(0.0, min(1.0, self._timers[0][0] - now)) if self._timers else 1.0

    def _commit_ready(self, sub: Any) -> None:
        with self._lock:
            ready, self._ready = self._ready, {}
        for d in ready.values():
            try:
                sub.commit(d)
                self.stats.add("commits")
            except LogError as exc:  # e.g. the partition was revoked meanwhile
                logger.warning("%s: %s", self.group, exc)

    # -- handling (pool threads) ------------------------------------------------------
    def _run_job(self, job: _Job) -> None:
        try:
            outcome = self._handle(job.event)
        except Exception as exc:
            delay = self.retry_delays[min(job.attempts, len(self.retry_delays) - 1)]
            job.attempts += 1
            self.stats.add("handler_errors")
            if not isinstance(exc, LogError) and job.attempts >= self.max_attempts:
                # A bug (not the log or the broker, which are retried for ever): do not
                # hold the partition's commits for ever behind one poison event, and do not
                # leave its session waiting for ever on work nobody will do: end it, saying why.
                self.stats.add("abandoned")
                why = (f"{self.group}: handling {job.event.type} seq {job.event.seq} failed "
                       f"{job.attempts} times: {type(exc).__name__}: {exc}")
                logger.error("%s: giving up on session %s: %s", self.group, job.event.session_id, why)
                self._fail_session(job.event, why)
                self._complete(job, DONE)
                return
            logger.warning("%s: handling %s seq %s of session %s failed (attempt %d; again in %.1fs): %s: %s",
                           self.group, job.event.type, job.event.seq, job.event.session_id,
                           job.attempts, delay, type(exc).__name__, exc)
            outcome = ("retry", time.monotonic() + delay)
        self._complete(job, outcome)

    def _handle(self, event: ev.Event) -> str | tuple[str, float]:
        state = self.state(event.session_id)
        acted = False
        for proc in self.processors:
            if event.type not in proc.triggers:
                continue
            emits = proc.handle(event, state)
            self.stats.add(f"handled.{proc.name}")
            if emits:
                acted = True
                state = self._append(state, event, emits, proc.name)
        # Waiting on the clock: the head (a model retry), or an owed event such as a tool
        # retry that is not due yet; handled again when it is.
        if state.wake_at_ms is not None and not acted and (event.seq == state.seq or event.seq in open_work(state)):
            self.stats.add("clock_waits")
            delay = max(0.0, (state.wake_at_ms - ev.now_ms()) / 1000) + 0.005
            return ("wake", time.monotonic() + delay)
        return DONE

    def _fail_session(self, cause: ev.Event, reason: str) -> None:
        """End a session whose owed work (`cause`) a handler cannot do, unless it has moved on."""
        try:
            state = self.refresh(cause.session_id)
            if state.terminal or (cause.seq != state.seq and cause.seq not in open_work(state)):
                return
            self._append(state, cause, [Emit(ev.SessionFailed(reason=reason, error_kind="internal"),
                                             key="handler-failed")], self.group)
            self.stats.add("sessions_failed")
        except Exception as exc:  # the log is down too: the session stays as it is
            logger.error("%s: could not end session %s: %s", self.group, cause.session_id, exc)

    def _append(self, state: SessionState, cause: ev.Event, emits: Sequence[Emit], actor: str) -> SessionState:
        for _ in range(8):
            batch = build_events(state, cause, emits, actor, self.secrets)
            try:
                preview = fold(batch, state, transition=machine_next_state)
            except Exception as exc:  # illegal after all: a bug, never stored (retried, then the session fails)
                self.stats.add("illegal")
                raise RuntimeError(f"{actor} emitted an illegal batch: {exc}") from exc
            try:
                self.log.append(state.session_id, batch, state.next_seq)
            except DuplicateEvent:
                self.stats.add("duplicates")
                return self.refresh(state.session_id)
            except ConcurrencyError:
                self.stats.add("conflicts")
                state = self.refresh(state.session_id)
                if cause.seq in open_work(state):
                    continue  # still owed: the same facts after the new head
                return state
            self._remember(preview)
            self.stats.add("appended", len(batch))
            if self.on_event:
                for e in batch:
                    self.on_event(e)
            return preview
        raise LogError(f"session {state.session_id}: {actor}'s append for seq {cause.seq} kept conflicting")

    # -- state cache ------------------------------------------------------------------
    def state(self, session_id: str) -> SessionState:
        """The session folded to the head of the log (incrementally from the cache)."""
        with self._cache_lock:
            cached = self._cache.get(session_id)
            if cached is not None:
                self._cache.move_to_end(session_id)
        new = self.log.read(session_id, cached.next_seq if cached is not None else 0)
        if not new and cached is not None:
            return cached
        state = fold(new, cached)
        if state.seq < 0:
            raise LogError(f"session {session_id} is not in the log")
        self._remember(state)
        return state

    def refresh(self, session_id: str) -> SessionState:
        return self.state(session_id)

    def _remember(self, state: SessionState) -> None:
        with self._cache_lock:
            old = self._cache.get(state.session_id)
            if old is None or old.seq <= state.seq:
                self._cache[state.session_id] = state
                self._cache.move_to_end(state.session_id)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)


def install_signal_handlers(worker: Worker, *extra_stops: Callable[[], None]) -> None:
    """SIGTERM/SIGINT stop the worker gracefully; a second signal exits at once."""

    def handler(signum: int, frame: Any) -> None:
        if worker.stopping:
            raise SystemExit(128 + signum)
        logger.info("signal %d: stopping after the running handlers finish", signum)
        worker.stop()
        for stop in extra_stops:
            stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
