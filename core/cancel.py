"""Stopping work in flight: the token a driver gives each handler run, and the waits that honour it.

A driver runs every handler under a `Cancel` token made current with `scope` (a context
variable: no processor takes, passes or decides anything about it). The I/O a handler
does stops when the token is cancelled: a provider's HTTP request, a scripted model's
wait and a tool's thread go through `run_in_thread` and `sleep`, which raise `Interrupted`
at once; what must be torn down (a connection, a subprocess) registers with `on_cancel`.
Who cancels, and why, is the driver's business (runtime/watch.py: the session was ended by
someone else); docs/architecture.md#cancelling-work-in-flight.
"""
from __future__ import annotations

import _thread
import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
logger = logging.getLogger("loopstream.cancel")


class Interrupted(BaseException):
    """The work was stopped because its token was cancelled; what it would have returned is
    not written. A BaseException, like KeyboardInterrupt, so a handler's `except Exception`
    never turns an interruption into a result (a ToolFailed, an extractive summary)."""


class Cancel:
    """A one-way switch: `cancel()` once, and every waiter and stop registered wakes."""

    def __init__(self) -> None:
        self._set = threading.Event()
        self._lock = threading.Lock()
        self._stops: dict[int, Callable[[], None]] = {}
        self._next = 0
        self.reason = ""

    @property
    def cancelled(self) -> bool:
        return self._set.is_set()

    def cancel(self, reason: str = "cancelled") -> None:
        """Cancel (the first reason is kept); runs every registered stop, in this thread."""
        with self._lock:
            if self._set.is_set():
                return
            self.reason = reason
            self._set.set()
            stops, self._stops = list(self._stops.values()), {}
        for stop in stops:
            _run_stop(stop)

    def on_cancel(self, stop: Callable[[], None]) -> Callable[[], None]:
        """Call `stop` when the token is cancelled (at once if it already is); returns a
        function that unregisters it. A stop must be quick and must not raise."""
        with self._lock:
            if not self._set.is_set():
                key, self._next = self._next, self._next + 1
                self._stops[key] = stop
                return lambda: self._stops.pop(key, None)
        _run_stop(stop)
        return lambda: None

    def wait(self, seconds: float | None = None) -> bool:
        """Wait up to `seconds` (None: for ever) for the token to be cancelled; whether it is."""
        return self._set.wait(seconds)

    def check(self) -> None:
        """Raise Interrupted if the token is cancelled."""
        if self._set.is_set():
            raise Interrupted(self.reason)


class _Never(Cancel):
    """The token outside any driver's scope: nothing can cancel it."""

    def cancel(self, reason: str = "cancelled") -> None:
        raise RuntimeError("no work in flight here to cancel (no cancel scope)")


NEVER: Cancel = _Never()
_current: contextvars.ContextVar[Cancel] = contextvars.ContextVar("loopstream_cancel", default=NEVER)


def current() -> Cancel:
    """The token of the work running in this thread (NEVER outside a scope)."""
    return _current.get()


@contextmanager
def scope(token: Cancel) -> Iterator[Cancel]:
    """Make `token` current while the block runs. Leaving the block by an exception
    (Ctrl-C, a bug) cancels it, so what the work left running (a connection, a
    subprocess) is stopped rather than left behind."""
    reset = _current.set(token)
    try:
        yield token
    except BaseException as exc:
        if not token.cancelled and token is not NEVER:
            token.cancel(f"stopped by {type(exc).__name__}")
        raise
    finally:
        _current.reset(reset)


def sleep(seconds: float) -> None:
    """Wait `seconds`, or raise Interrupted as soon as the current token is cancelled."""
    token = current()
    if token.wait(seconds):
        raise Interrupted(token.reason)


def run_in_thread(fn: Callable[[], T], *, timeout: float | None = None, name: str = "loopstream-call") -> T:
    """`fn()` run in a daemon helper thread under the current token, waited for: its result
    or its exception; TimeoutError after `timeout` seconds; Interrupted as soon as the token
    is cancelled. Python cannot stop a thread: after a timeout or an interruption it is
    abandoned and runs on until `fn` returns (what `fn` registered with `on_cancel` is
    stopped). Outside a scope with no timeout, `fn` simply runs here.

    Helper threads are reused (`_POOL`): starting a thread per call cost more than the rest
    of a scripted step. A thread that finishes `fn` waits for the next call up to
    `IDLE_EXIT_S`, then exits; an abandoned thread rejoins the pool only once `fn` returns."""
    token = current()
    if token is NEVER and timeout is None:
        return fn()
    token.check()
    box: dict = {}
    woken = _thread.allocate_lock()  # a bare lock, held until the call ends or the token is cancelled:
    woken.acquire()  # the quickest hand-over between two threads Python has

    def wake() -> None:
        try:
            woken.release()
        except RuntimeError:  # woken already (the call ended and the token was cancelled)
            pass

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the waiting thread
            box["error"] = exc
        finally:
            wake()

    context = contextvars.copy_context()  # the thread sees the same token
    _POOL.submit(lambda: context.run(target), name)
    unregister = token.on_cancel(wake)
    try:
        if not woken.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            raise TimeoutError
    finally:
        unregister()
    token.check()
    if "error" in box:
        raise box["error"]
    return box["result"]


IDLE_EXIT_S = 30.0  # an idle helper thread exits after this long without work


class _Helpers:
    """Idle daemon threads waiting for work: `submit` hands a job to one of them, or starts
    a new one when none is idle. A job never waits for a busy thread, so an abandoned call
    (one that runs on after a timeout) holds up nobody; each thread runs one job at a time."""

    def __init__(self, idle_exit_s: float = IDLE_EXIT_S) -> None:
        self.idle_exit_s = idle_exit_s
        self._lock = threading.Lock()
        self._idle: list[_Helper] = []  # last in, first out: the warmest thread runs next

    def submit(self, job: Callable[[], None], name: str) -> None:
        with self._lock:
            helper = self._idle.pop() if self._idle else None
        if helper is None:
            helper = _Helper(self)
            helper.give(job, name)
            helper.thread.start()
        else:
            helper.give(job, name)

    def idle(self) -> int:
        """How many helper threads wait for work now."""
        with self._lock:
            return len(self._idle)

    def _rest(self, helper: _Helper) -> None:
        with self._lock:
            self._idle.append(helper)

    def _leave(self, helper: _Helper) -> bool:
        """Take `helper` out of the idle list before it exits; False if a job was given to it meanwhile."""
        with self._lock:
            if helper in self._idle:
                self._idle.remove(helper)
                return True
            return False


class _Helper:
    def __init__(self, pool: _Helpers) -> None:
        self.pool = pool
        self.ready = _thread.allocate_lock()  # released when a job is given
        self.ready.acquire()
        self.job: Callable[[], None] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="loopstream-helper")

    def give(self, job: Callable[[], None], name: str) -> None:
        self.job = job
        self.thread.name = name
        self.ready.release()

    def _run(self) -> None:
        while True:
            if not self.ready.acquire(timeout=self.pool.idle_exit_s):
                if self.pool._leave(self):
                    return
                self.ready.acquire()  # handed a job just as it timed out: it is on its way
            job, self.job = self.job, None
            if job is not None:
                job()  # never raises: run_in_thread's target keeps every exception
            job = None
            self.pool._rest(self)


_POOL = _Helpers()


def _run_stop(stop: Callable[[], None]) -> None:
    try:
        stop()
    except Exception:  # one failing stop must not keep the others from running
        logger.exception("a cancel stop failed")
