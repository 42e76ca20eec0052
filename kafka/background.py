"""A loop that runs in its own daemon thread next to a worker (the goal intake, the results
relay): `start()`, `stop()` (safe from signal handlers and other threads), `join()`, and
`error`, what stopped it if it died, which the worker polls to stop the process."""
from __future__ import annotations

import logging
import threading

logger = logging.getLogger("loopstream.background")


class BackgroundLoop:
    """Subclasses implement `_loop()`, checking `self._stop` (a threading.Event) between steps."""

    label = "background loop"

    def __init__(self, thread_name: str) -> None:
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_name = thread_name

    def start(self) -> BackgroundLoop:
        self._thread = threading.Thread(target=self._run_logged, name=self._thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run_logged(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # kept for the worker, which stops the process on it
            self.error = exc
            logger.error("%s stopped: %s: %s", self.label, type(exc).__name__, exc)

    def _loop(self) -> None:
        raise NotImplementedError
