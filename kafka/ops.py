"""The operations surface of a worker (`loopstream worker --metrics-port`): liveness
(`/healthz`), readiness (`/readyz`) and Prometheus metrics (`/metrics`) over HTTP, bound
to loopback unless told otherwise. Needs prometheus-client (the [kafka] extra). What each
metric means and how to probe: docs/kafka.md#operations."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from loopstream.core import events as ev
from loopstream.core.log import LogError
from loopstream.kafka import clients
from loopstream.kafka.clients import EVENTS

try:  # the [kafka] extra
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
except ImportError:  # pragma: no cover - exercised only without the extra
    CollectorRegistry = None  # type: ignore[assignment,misc]

logger = logging.getLogger("loopstream.ops")

SESSION_STATE = {"SessionFinished": "done", "SessionFailed": "failed", "SessionCancelled": "cancelled"}
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class OpsError(RuntimeError):
    """The operations surface cannot start (no prometheus-client, the port is taken)."""


class WorkerOps:
    """Health and metrics of one worker process. `lag_groups` maps a consumer group to the
    topic it consumes (the role's group on the events topic, the goal intake's on the goals
    topic); their lag is read at each scrape with a reader of the group (never joined).
    `helpers` are background loops (goal intake, relay) whose death makes the process not live."""

    def __init__(self, worker: Any, role: str, *, lag_groups: Mapping[str, str] | None = None,
                 bootstrap: str | None = None, settings: Any = None, helpers: Iterable[Any] = (),
                 stale_after: float = 30.0) -> None:
        if CollectorRegistry is None:
            raise OpsError("--metrics-port needs prometheus-client: pip install 'loopstream[kafka]'")
        self.worker, self.role, self.helpers = worker, role, list(helpers)
        self.lag_groups = dict(lag_groups or {})
        self.bootstrap, self.settings, self.stale_after = bootstrap, settings, stale_after
        self.registry = CollectorRegistry()
        self.latency = Histogram("loopstream_handler_seconds", "Time a handler took to act on one owed "
                                 "event (a model call, a tool call, an orchestrator step), by actor and outcome",
                                 ["role", "actor", "outcome"], buckets=BUCKETS, registry=self.registry)
        self.appended = Counter("loopstream_events_appended", "Events this process appended, by type "
                                "(RetryScheduled: retries; ModelFailed, ToolFailed, SessionFailed: failures)",
                                ["role", "type"], registry=self.registry)
        self.registry.register(_Collector(self))
        self._readers: dict[str, Any] = {}
        self._lag_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._previous_on_event: Callable[[ev.Event], None] | None = None

    # -- hooks into the worker -------------------------------------------------------------
    def attach(self, *writers: Any) -> WorkerOps:
        """Observe the worker's handlers and the events `writers` append (the worker's, the intake's)."""
        self.worker.on_handled = self._handled
        for w in writers:
            w.on_event = self._counting(w.on_event)
        return self

    def _handled(self, actor: str, seconds: float, outcome: str) -> None:
        self.latency.labels(self.role, actor, outcome).observe(seconds)

    def _counting(self, then: Callable[[ev.Event], None] | None) -> Callable[[ev.Event], None]:
        def on_event(e: ev.Event) -> None:
            self.appended.labels(self.role, e.type).inc()
            if then is not None:
                then(e)
        return on_event

    # -- health ----------------------------------------------------------------------------
    def live(self) -> tuple[bool, str]:
        """Alive: the poll loop turns (within `stale_after` s; a loop waiting for room in its
        buffer turns too) and no helper died."""
        dead = [h.label for h in self.helpers if getattr(h, "error", None) is not None]
        if dead:
            return False, f"stopped: {', '.join(dead)}"
        last = self.worker.last_turn
        if last is not None and time.monotonic() - last > self.stale_after:
            return False, f"the poll loop has not turned for {time.monotonic() - last:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """Ready: alive, polled at least once, the last poll reached the log, and not stopping."""
        live, why = self.live()
        if not live:
            return False, why
        if self.worker.stopping:
            return False, "stopping"
        if getattr(self.worker, "lost", None):
            return False, f"lost: {self.worker.lost}"
        if self.worker.last_poll is None:
            return False, "starting"
        if self.worker.poll_error is not None:
            return False, f"the log is unreachable: {self.worker.poll_error}"
        return True, "ok"

    # -- lag -------------------------------------------------------------------------------
    def lag(self) -> dict[tuple[str, str, int], int]:
        """(group, topic, partition) -> records not yet committed by the group."""
        out: dict[tuple[str, str, int], int] = {}
        if self.bootstrap is None:
            return out
        with self._lag_lock:
            for group, topic in self.lag_groups.items():
                reader = self._readers.get(group)
                if reader is None:  # lag counts records up to the high watermark, whatever the isolation
                    reader = self._readers[group] = clients.reader(self.bootstrap, "loopstream-lag", EVENTS,
                                                                   settings=self.settings, group=group)
                try:
                    for p, n in clients.lag(reader, topic, timeout=5.0).items():
                        out[(group, topic, p)] = n
                except LogError as exc:
                    logger.warning("metrics: %s", exc)
        return out

    # -- serving ---------------------------------------------------------------------------
    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve in a daemon thread; the port (0: a free one)."""
        ops = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, code = generate_latest(ops.registry), CONTENT_TYPE_LATEST, 200
                elif path in ("/healthz", "/readyz"):
                    ok, why = ops.live() if path == "/healthz" else ops.ready()
                    body, ctype, code = (why + "\n").encode(), "text/plain; charset=utf-8", 200 if ok else 503
                else:
                    body, ctype, code = b"not found: /healthz /readyz /metrics\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # no access log on stderr
                pass

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise OpsError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="ls-ops", daemon=True).start()
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lag_lock:
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()


class _Collector:
    """Values read at scrape time: worker counters, handlers in flight, lag, sessions by state."""

    def __init__(self, ops: WorkerOps) -> None:
        self.ops = ops

    def describe(self) -> list[Any]:
        return []  # values are read at scrape time only

    def collect(self) -> Iterable[Any]:
        ops, w = self.ops, self.ops.worker
        stats = w.stats.snapshot()
        counters = CounterMetricFamily("loopstream_worker", "Worker counters (delivered, handled.<actor>, "
                                       "appended, handler_errors: retried handler failures, abandoned, "
                                       "sessions_failed, conflicts, duplicates, commits, ...)", labels=["role", "kind"])
        for kind, n in sorted(stats.items()):
            counters.add_metric([ops.role, kind], n)
        yield counters
        retries = CounterMetricFamily("loopstream_handler_retries", "Handler attempts that failed and were "
                                      "scheduled again", labels=["role"])
        retries.add_metric([ops.role], stats.get("handler_errors", 0))
        yield retries
        failures = CounterMetricFamily("loopstream_handler_failures", "Events given up on after max attempts "
                                       "(their sessions failed)", labels=["role"])
        failures.add_metric([ops.role], stats.get("abandoned", 0))
        yield failures
        active = GaugeMetricFamily("loopstream_in_flight", "Handlers acting now by actor (model: model calls, "
                                   "tools: tool calls)", labels=["role", "actor"])
        with w.stats.lock:
            running = dict(w.active)
        for actor in sorted({"model", "tools", "orchestrator", *running}):
            active.add_metric([ops.role, actor], running.get(actor, 0))
        yield active
        buffered = GaugeMetricFamily("loopstream_deliveries_in_flight", "Deliveries received and not yet "
                                     "committed", labels=["role"])
        buffered.add_metric([ops.role], w.in_flight())
        yield buffered
        lag = GaugeMetricFamily("loopstream_consumer_lag", "Records a consumer group has not committed yet, "
                                "per partition", labels=["role", "group", "topic", "partition"])
        for (group, topic, p), n in sorted(ops.lag().items()):
            lag.add_metric([ops.role, group, topic, str(p)], n)
        yield lag
        sessions = GaugeMetricFamily("loopstream_sessions", "Sessions in this process's view of the log by "
                                     "state (open: not ended)", labels=["state"])
        for state, n in sorted(_sessions_by_state(w.log).items()):
            sessions.add_metric([state], n)
        yield sessions
        up = GaugeMetricFamily("loopstream_ready", "1 when /readyz answers 200", labels=["role"])
        up.add_metric([ops.role], 1 if ops.ready()[0] else 0)
        yield up


def _sessions_by_state(log: Any) -> dict[str, int]:
    """Counts by state from the sessions table of the log (a KafkaLog's projection, as it is
    now: a scrape never waits for the broker)."""
    projection = getattr(log, "projection", None)
    store = projection.store if projection is not None else log
    out = {"open": 0, "done": 0, "failed": 0, "cancelled": 0}
    try:
        with store.snapshot() as c:
            rows = c.execute("SELECT last_type, COUNT(*) FROM sessions GROUP BY last_type").fetchall()
    except Exception as exc:  # a log without that table: no session metric
        logger.debug("metrics: sessions: %s", exc)
        return out
    for last_type, n in rows:
        state = SESSION_STATE.get(last_type, "open")
        out[state] += n
    return out
