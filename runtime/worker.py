"""The subscription driver: processors run by a log subscription (Kafka, or SQLite's).

It only moves events: per-session ordering, clock waits, commit after handling, poison
handling. What is dispatched is the shared rule (`runtime/dispatch.py`), what is written
goes through the session writer; docs/architecture.md#the-worker says how and why.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import signal
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from loopstream.core import events as ev
from loopstream.core.log import Delivery, Log, LogError, LogLost
from loopstream.core.processor import Emit, Observer, Processor
from loopstream.core.secrets import Secrets
from loopstream.core.state import SessionState, fold, open_work
from loopstream.runtime.dispatch import Dispatch
from loopstream.runtime.watch import EndWatcher
from loopstream.runtime.writer import Clock, EventCallback, SessionWriter, Written

logger = logging.getLogger("loopstream.worker")

DONE = "done"


@dataclass
class _Job:
    delivery: Delivery
    part: Any
    offset: Any
    attempts: int = 0
    generation: int = 0  # Worker._generation when it was accepted

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
    """Run `processors` (and observers) over `log` as consumer group `group`: each delivered
    event that is owed to one of their actors is dispatched, one session's deliveries in log
    order, different sessions in parallel (`concurrency` threads)."""

    def __init__(
        self,
        log: Log,
        processors: Sequence[Processor | Observer],
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
        clock: Clock = ev.now_ms,
        on_handled: Callable[[str, float, str], None] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.log, self.group = log, group
        self.processors = list(processors)
        self.dispatch = Dispatch(self.processors, EndWatcher(log))  # a session ended elsewhere stops its handler
        self.triggers = self.dispatch.triggers
        self.concurrency = concurrency
        self.writer = SessionWriter(log, secrets=secrets, on_event=on_event, clock=clock)
        self.poll_max, self.poll_timeout = poll_max, poll_timeout
        self.max_buffered, self.cache_size = max_buffered, cache_size
        self.drain_timeout = drain_timeout
        self.retry_delays = tuple(retry_delays)
        self.max_attempts = max_attempts
        self.stats = WorkerStats()
        # For the operations surface (kafka/ops.py): `on_handled(actor, seconds, outcome)` after
        # each handler that acted; handlers running now per actor; the last poll's time and error.
        self.on_handled = on_handled
        self.active: Counter = Counter()
        self.last_poll: float | None = None  # time.monotonic() of the last poll that answered
        self.last_turn: float | None = None  # of the last turn of the poll loop (it may wait, not poll)
        self.poll_error: str | None = None
        # Why the log lost what it held (LogLost): the worker takes no work until it resumes.
        self.lost: str | None = None
        self._generation = 0  # +1 when a lost log's work is forgotten
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
                self.last_turn = time.monotonic()
                self._commit_ready(sub)
                wait = self._fire_timers()
                if until is not None and until():
                    break
                if self.in_flight() >= self.max_buffered:
                    self._stop.wait(min(0.05, wait))
                    continue
                try:
                    deliveries = sub.poll(max_events=self.poll_max, timeout=min(self.poll_timeout, wait))
                except LogLost as exc:  # said once, loudly, by the log; no retry storm, SIGTERM still stops
                    if self.lost is None:
                        self.lost = self.poll_error = str(exc)
                        self._forget()
                    self._stop.wait(1.0)
                    continue
                except LogError as exc:
                    logger.warning("%s: poll failed: %s", self.group, exc)
                    self.poll_error = str(exc)
                    self._stop.wait(1.0)
                    continue
                self.last_poll, self.poll_error = time.monotonic(), None
                if self.lost is not None:
                    logger.warning("%s: the log was restored; taking work again", self.group)
                    self.lost = None
                    self._forget()
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

    def _forget(self) -> None:
        """Drop every delivery in flight and every cached state (the log lost them, or was
        restored with other offsets): nothing is committed for them; handlers still running
        finish into the void."""
        with self._lock:
            self._generation += 1
            self._parts.clear()
            self._queues.clear()
            self._timers.clear()
            self._ready.clear()
        with self._cache_lock:
            self._cache.clear()

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
        with self._lock:
            job = _Job(d, part, off, generation=self._generation)
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
            if job.generation != self._generation:
                pass  # accepted before the log was lost: forgotten
            elif outcome == DONE:
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
        except LogLost:  # not retried: the worker forgets its work until the log is restored
            with self._lock:
                self._running -= 1
                self._idle.notify_all()
            return
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
        item = self.dispatch.owed(state, event.seq)  # None: not owed (any more), or not ours
        if item is not None:
            now = self.writer.clock()
            if not item.due(now):  # a retry's backoff: handled again when it is due
                self.stats.add("clock_waits")
                return ("wake", time.monotonic() + (item.not_before_ms - now) / 1000 + 0.005)
            self.stats.add(f"handled.{item.actor}")
            started, outcome = time.monotonic(), "error"
            with self.stats.lock:
                self.active[item.actor] += 1
            try:
                for written in self.dispatch.act(self.writer, state, item, event, now):
                    state = self._count(written)
                outcome = "ok"
            finally:
                with self.stats.lock:
                    self.active[item.actor] -= 1
                if self.on_handled is not None:
                    self.on_handled(item.actor, time.monotonic() - started, outcome)
        for observer in self.dispatch.observers:
            if event.type in observer.triggers:
                observer.handle(event, state)
        return DONE

    def _count(self, written: Written) -> SessionState:
        if written.appended:
            self.stats.add("appended", len(written.events))
        else:
            self.stats.add({"duplicate": "duplicates", "interrupted": "interrupted"}.get(written.outcome, "dropped"))
        if written.conflicts:
            self.stats.add("conflicts", written.conflicts)
        self._remember(written.state)
        return written.state

    def _fail_session(self, cause: ev.Event, reason: str) -> None:
        """End a session whose owed work (`cause`) a handler cannot do, unless it has moved on."""
        try:
            state = self.refresh(cause.session_id)
            item = next((o for o in open_work(state) if o.seq == cause.seq), None)
            if item is None:
                return
            failed = ev.SessionFailed(reason=reason, error_kind="internal")
            if self._count(self.writer.emit(state, item, cause, [Emit(failed, key="handler-failed")],
                                            self.group)).terminal:
                self.stats.add("sessions_failed")
        except Exception as exc:  # the log is down too: the session stays as it is
            logger.error("%s: could not end session %s: %s", self.group, cause.session_id, exc)

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
