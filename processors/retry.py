"""Backoff for failed model calls: exponential with equal jitter, or the server's
Retry-After when it gave one. The jitter is derived from the request id, so a handler
that runs twice decides the same delay (and writes the same RetryScheduled)."""
from __future__ import annotations

import hashlib

from loopstream.core.policy import Retries


def backoff_ms(attempt: int, seed: str, *, base_ms: int = Retries().base_ms, max_ms: int = Retries().max_ms) -> int:
    """Delay before `attempt` (2, 3, …): half of the exponential step fixed, half jittered."""
    step = min(max_ms, base_ms * 2 ** max(0, attempt - 2))
    fraction = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:4], "big") / 2**32
    return int(step / 2 + fraction * step / 2)


def retry_delay_ms(attempt: int, seed: str, retry_after_ms: int | None, retries: Retries) -> int | None:
    """The delay to wait, or None when the server asks for longer than we are willing to wait."""
    if retry_after_ms is not None:
        return retry_after_ms if retry_after_ms <= retries.retry_after_max_ms else None
    return backoff_ms(attempt, seed, base_ms=retries.base_ms, max_ms=retries.max_ms)
