"""A client-side rate limiter per provider: requests and tokens per minute.

Two token buckets that refill continuously. `acquire(tokens)` waits until both have
room (so a burst spreads out instead of earning 429s), then debits them; `settle`
corrects the token debit with what the call really used. Waiting is process-local:
several worker processes each need their own share of the limit.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from loopstream.core import cancel


class _Bucket:
    def __init__(self, per_minute: float, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.at = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` fits (an amount over capacity waits for a full bucket)."""
        need = min(amount, self.capacity) - self.level
        return max(0.0, need / self.rate)


class RateLimiter:
    def __init__(
        self,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = cancel.sleep,  # a wait the driver can interrupt
    ) -> None:
        self.clock, self.sleep = clock, sleep
        now = clock()
        self.requests = _Bucket(requests_per_minute, now) if requests_per_minute else None
        self.tokens = _Bucket(tokens_per_minute, now) if tokens_per_minute else None
        self._lock = threading.Lock()
        self.waited = 0.0  # total seconds spent waiting (for progress and benchmarks)

    def acquire(self, tokens: int = 0) -> float:
        """Block until one request of about `tokens` tokens is allowed; return the wait."""
        waited = 0.0
        with self._lock:
            while True:
                now = self.clock()
                buckets = [(b, n) for b, n in ((self.requests, 1), (self.tokens, tokens)) if b is not None]
                for bucket, _ in buckets:
                    bucket.refill(now)
                delay = max((b.wait_for(n) for b, n in buckets), default=0.0)
                if delay <= 0:
                    for bucket, amount in buckets:
                        bucket.level -= amount
                    self.waited += waited
                    return waited
                self.sleep(delay)
                waited += delay

    def settle(self, estimated: int, actual: int) -> None:
        """Correct the token debit once the provider reported what the call used."""
        if self.tokens is not None:
            with self._lock:
                self.tokens.level = min(self.tokens.capacity, self.tokens.level + estimated - actual)
