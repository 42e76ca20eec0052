"""Export a session's trace (observe/spans.py) with the OpenTelemetry SDK over OTLP/HTTP
(protobuf), after the fact or following a live session. Needs the `[otel]` extra.

The spans are built as the SDK's own `ReadableSpan`s with the ids and times the log gives
(not through a tracer, which would draw random ids and read the clock), and handed to the
SDK's `OTLPSpanExporter`: the same session exported twice sends the same spans.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event as OtelEvent
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from loopstream.core.log import Log
from loopstream.core.state import fold
from loopstream.observe.spans import SpanRecord, session_spans

SCOPE = InstrumentationScope("loopstream.observe", "1")
DEFAULT_PROJECT = "loopstream"


class ExportError(RuntimeError):
    """The receiver refused the spans or could not be reached (one line)."""


def traces_url(url: str) -> str:
    """The OTLP/HTTP traces endpoint for `url`: a base URL gets `/v1/traces` appended."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--otlp {url!r}: an http:// or https:// URL, e.g. http://127.0.0.1:6006")
    return url if url.endswith("/v1/traces") else url + "/v1/traces"


def exporter(url: str, timeout: float = 10.0) -> OTLPSpanExporter:
    """The SDK's OTLP/HTTP (protobuf) span exporter for `url` (see `traces_url`)."""
    return OTLPSpanExporter(endpoint=traces_url(url), timeout=timeout)


def resource(project: str = DEFAULT_PROJECT) -> Resource:
    """`service.name` loopstream; `openinference.project.name` picks the Phoenix project."""
    return Resource.create({"service.name": "loopstream", "openinference.project.name": project})


def _context(trace_id: int, span_id: int) -> SpanContext:
    return SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))


def to_sdk(span: SpanRecord, res: Resource) -> ReadableSpan:
    """One record as the SDK's ReadableSpan (an open span ends where it started)."""
    status = Status(StatusCode.ERROR, span.error) if span.error else Status(StatusCode.UNSET)
    return ReadableSpan(
        name=span.name, context=_context(span.trace_id, span.span_id),
        parent=_context(span.trace_id, span.parent_id) if span.parent_id else None,
        resource=res, attributes=span.attributes,
        events=[OtelEvent(e.name, e.attributes, e.time_ns) for e in span.events],
        links=[Link(_context(t, s)) for t, s in span.links],
        kind=SpanKind.CLIENT if span.kind == "client" else SpanKind.INTERNAL,
        status=status, start_time=span.start_ns, end_time=span.end_ns if span.end_ns is not None else span.start_ns,
        instrumentation_scope=SCOPE,
    )


def send(spans: Sequence[SpanRecord], sink: SpanExporter, project: str = DEFAULT_PROJECT) -> int:
    """Export `spans` through `sink`; how many. ExportError if the receiver said no."""
    if not spans:
        return 0
    res = resource(project)
    logger = logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    level, logger.level = logger.level, logging.CRITICAL  # its retry warnings are our one-line error
    try:
        result = sink.export([to_sdk(s, res) for s in spans])
    finally:
        logger.setLevel(level)
    if result is not SpanExportResult.SUCCESS:
        raise ExportError(f"the OTLP receiver did not take {len(spans)} spans (is it running at that URL?)")
    return len(spans)


@dataclass
class Exported:
    spans: int
    status: str  # the session's status when the export stopped


def export_session(log: Log, session_id: str, sink: SpanExporter, project: str = DEFAULT_PROJECT) -> Exported:
    """Export a stored session's trace as the log has it now (open spans end where they began)."""
    events = log.read(session_id)
    return Exported(send(session_spans(events), sink, project), fold(events).status if events else "new")


def follow_session(log: Log, session_id: str, sink: SpanExporter, project: str = DEFAULT_PROJECT, *,
                   poll_s: float = 0.5, until: Callable[[], bool] = lambda: False,
                   sleep: Callable[[float], None] = time.sleep) -> Exported:
    """Tail a live session: export each span once it has ended, until the session ends (then
    everything, the session span last) or `until()` says stop."""
    sent: set[int] = set()
    count = 0
    while True:
        events = log.read(session_id)
        state = fold(events) if events else None
        spans = session_spans(events)
        ended = state is not None and state.terminal
        fresh = [s for s in spans if s.span_id not in sent and (ended or s.ended)]
        count += send(fresh, sink, project)
        sent.update(s.span_id for s in fresh)
        if ended or until():
            return Exported(count, state.status if state else "new")
        sleep(poll_s)
