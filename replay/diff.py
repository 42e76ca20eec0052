"""Diff two sessions (typically a parent and its fork): where they first differ and how
their outcomes compare (status, answer, tokens, steps, model and tool calls).

Events are compared by type and payload, ignoring what differs between any two runs of
the same thing: ids and times in the envelope, the session in derived request ids
(`request_id`) and measured latencies (`latency_ms`). SessionForked markers are
provenance, not behaviour: they are skipped when the streams are aligned, so a fork
made with no changes that ran the same way diffs as identical.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from loopstream.core import events as ev
from loopstream.core.describe import call_text, summarize
from loopstream.core.log import Log
from loopstream.replay.replayer import ModelCall, ReplayReport, ToolCallView, replay

IGNORED_FIELDS = frozenset({"request_id", "latency_ms"})


@dataclass
class SessionSummary:
    session_id: str
    status: str
    answer: str | None
    error: str | None
    events: int
    steps: int
    model_calls: int
    model_failures: int
    tool_calls: list[str]  # "name(args)" in order
    tool_errors: int
    input_tokens: int
    output_tokens: int
    models: list[str]  # models that answered, in order of first use
    forked_from: tuple[str, int] | None  # (parent session, parent seq)
    chain: str


@dataclass
class FirstDivergence:
    seq_a: int | None  # None: a ended here
    seq_b: int | None
    a: str  # one-line summaries
    b: str
    fields: list[str] = field(default_factory=list)


@dataclass
class DiffReport:
    a: SessionSummary
    b: SessionSummary
    common_events: int  # aligned events that agree before the first divergence
    divergence: FirstDivergence | None
    relation: str  # "b is a fork of a at seq N", "a is a fork of b …", "siblings …", ""

    @property
    def identical(self) -> bool:
        return self.divergence is None


def diff(log: Log, a: str, b: str) -> DiffReport:
    """Diff sessions `a` and `b` of `log` (each replayed and verified; a broken chain shows
    in the summary's `chain`, and only its verified events are compared)."""
    return diff_reports(replay(log, a), replay(log, b))


def diff_reports(ra: ReplayReport, rb: ReplayReport) -> DiffReport:
    sa, sb = _summary(ra), _summary(rb)
    xa = [e for e in ra.events if e.type != "SessionForked"]
    xb = [e for e in rb.events if e.type != "SessionForked"]
    common, divergence = 0, None
    for i in range(max(len(xa), len(xb))):
        ka = _key(xa[i]) if i < len(xa) else None
        kb = _key(xb[i]) if i < len(xb) else None
        if ka == kb:
            common += 1
            continue
        fields = []
        if ka is not None and kb is not None and ka[0] == kb[0]:
            fields = sorted(f for f in ka[1].keys() | kb[1].keys() if ka[1].get(f) != kb[1].get(f))
        divergence = FirstDivergence(
            seq_a=xa[i].seq if i < len(xa) else None, seq_b=xb[i].seq if i < len(xb) else None,
            a=_one_line(xa[i]) if i < len(xa) else "(session ends)",
            b=_one_line(xb[i]) if i < len(xb) else "(session ends)", fields=fields,
        )
        break
    return DiffReport(sa, sb, common, divergence, _relation(sa, sb))


def _key(e: ev.Event) -> tuple[str, dict]:
    return e.type, {k: v for k, v in e.payload.model_dump().items() if k not in IGNORED_FIELDS}


def _summary(r: ReplayReport) -> SessionSummary:
    models: list[str] = []
    tools: list[str] = []
    for item in r.timeline:
        if isinstance(item, ModelCall) and item.ok and item.model not in models:
            models.append(item.model)
        elif isinstance(item, ToolCallView):
            tools.append(call_text(item.name, item.arguments_json))
    st, t = r.state, r.totals
    return SessionSummary(
        session_id=r.session_id, status=st.status, answer=st.answer, error=st.error, events=st.seq + 1,
        steps=t.steps, model_calls=t.model_calls, model_failures=t.model_failures, tool_calls=tools,
        tool_errors=t.tool_errors, input_tokens=t.input_tokens, output_tokens=t.output_tokens, models=models,
        forked_from=(r.forked_from.parent_session_id, r.forked_from.parent_seq) if r.forked_from else None,
        chain=r.chain.status,
    )


def _relation(a: SessionSummary, b: SessionSummary) -> str:
    if b.forked_from and b.forked_from[0] == a.session_id:
        return f"b is a fork of a at seq {b.forked_from[1]}"
    if a.forked_from and a.forked_from[0] == b.session_id:
        return f"a is a fork of b at seq {a.forked_from[1]}"
    if a.forked_from and b.forked_from and a.forked_from[0] == b.forked_from[0]:
        return f"both are forks of {a.forked_from[0]} (at seqs {a.forked_from[1]} and {b.forked_from[1]})"
    return ""


def _one_line(e: ev.Event) -> str:
    return f"seq {e.seq} {e.type} {summarize(e, 160)}"


def render(report: DiffReport, *, width: int = 100) -> str:
    a, b = report.a, report.b
    col = max(24, (width - 18) // 2)

    def row(name: str, va: object, vb: object) -> str:
        mark = " " if va == vb else "≠"
        sa, sb = _fit(str(va), col), _fit(str(vb), col)
        return f"{mark} {name:<14}{sa:<{col}}  {sb}"

    lines = [f"diff a={a.session_id} b={b.session_id}" + (f"  ({report.relation})" if report.relation else "")]
    if report.divergence is None:
        lines.append(f"identical behaviour: {report.common_events} events agree (ids, times, latencies ignored)")
    else:
        d = report.divergence
        lines.append(f"first divergence after {report.common_events} agreeing events: "
                     f"a seq {d.seq_a if d.seq_a is not None else '-'} vs b seq {d.seq_b if d.seq_b is not None else '-'}"
                     + (f" (fields: {', '.join(d.fields)})" if d.fields else ""))
        lines.append(f"  a: {_fit(d.a, width - 5)}")
        lines.append(f"  b: {_fit(d.b, width - 5)}")
    lines += [
        row("status", a.status, b.status),
        row("answer", repr(a.answer), repr(b.answer)),
        row("error", a.error or "-", b.error or "-"),
        row("events", a.events, b.events),
        row("steps", a.steps, b.steps),
        row("model calls", f"{a.model_calls} ({a.model_failures} failed)", f"{b.model_calls} ({b.model_failures} failed)"),
        row("models", ", ".join(a.models) or "-", ", ".join(b.models) or "-"),
        row("tool calls", f"{len(a.tool_calls)} ({a.tool_errors} failed)", f"{len(b.tool_calls)} ({b.tool_errors} failed)"),
        row("tokens in/out", f"{a.input_tokens:,} / {a.output_tokens:,}", f"{b.input_tokens:,} / {b.output_tokens:,}"),
        row("chain", a.chain, b.chain),
    ]
    only_a, only_b = _multiset_minus(a.tool_calls, b.tool_calls), _multiset_minus(b.tool_calls, a.tool_calls)
    if only_a or only_b:
        lines.append("tool calls only in a: " + (_fit("; ".join(only_a), width - 22) or "-"))
        lines.append("tool calls only in b: " + (_fit("; ".join(only_b), width - 22) or "-"))
    return "\n".join(lines)


def _multiset_minus(x: list[str], y: list[str]) -> list[str]:
    left = Counter(y)
    out = []
    for item in x:
        if left[item]:
            left[item] -= 1
        else:
            out.append(item)
    return out


def _fit(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"
