"""`loopstream stats`: figures over the sessions of a log, read from their events alone:
sessions by status, steps, tokens, cost, latency percentiles of model calls (per model) and
tool calls (per tool), failure and retry rates, eval pass rates and feedback.

Latencies are the ones the processors recorded (`latency_ms` of ModelResponded,
ModelFailed, ToolCompleted, ToolFailed), never a clock read now, so the figures of a
stored log never change.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields

from loopstream.core import events as ev
from loopstream.core.log import Log
from loopstream.core.state import fold
from loopstream.processors.budgets import cost_usd


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks; None if empty."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return float(xs[lo]) if lo == hi else xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass
class Calls:
    """Calls of one model or tool: count, failures, latency percentiles (ms)."""

    calls: int = 0
    failures: int = 0
    latencies: list[int] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {"calls": self.calls, "failures": self.failures,
                "failure_rate": round(self.failures / self.calls, 4) if self.calls else 0.0,
                **{f"p{q}_ms": percentile(self.latencies, q) for q in (50, 95, 99)}}


@dataclass
class Stats:
    sessions: int = 0
    by_status: Counter = field(default_factory=Counter)
    steps: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    priced_sessions: int = 0  # sessions whose policy gives prices (cost counts only those)
    model_retries: int = 0
    tool_retries: int = 0
    models: dict[str, Calls] = field(default_factory=lambda: defaultdict(Calls))
    tools: dict[str, Calls] = field(default_factory=lambda: defaultdict(Calls))
    evals_graded: int = 0
    evals_passed: int = 0
    feedback: int = 0
    feedback_scores: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        """The figures as plain JSON-ready data (`--json`)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["by_status"] = dict(sorted(self.by_status.items()))
        d["models"] = {k: v.summary() for k, v in sorted(self.models.items())}
        d["tools"] = {k: v.summary() for k, v in sorted(self.tools.items())}
        d["cost_usd"] = round(self.cost_usd, 6)
        d["tool_error_rate"] = _rate(sum(v.failures for v in self.tools.values()), sum(v.calls for v in self.tools.values()))
        d["model_failure_rate"] = _rate(sum(v.failures for v in self.models.values()),
                                        sum(v.calls for v in self.models.values()))
        d["eval_pass_rate"] = _rate(self.evals_passed, self.evals_graded)
        d["mean_feedback_score"] = (round(sum(self.feedback_scores) / len(self.feedback_scores), 4)
                                    if self.feedback_scores else None)
        del d["feedback_scores"]
        return d


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def add_session(stats: Stats, events: Sequence[ev.Event]) -> None:
    """Count one session's events into `stats`."""
    state = fold(events)
    stats.sessions += 1
    stats.by_status[state.status] += 1
    stats.steps += state.step
    stats.input_tokens += state.input_tokens
    stats.output_tokens += state.output_tokens
    spent = cost_usd(state)
    if spent is not None:
        stats.cost_usd += spent
        stats.priced_sessions += 1
    model_of: dict[str, str] = {}  # request id -> model
    for e in events:
        p = e.payload
        match p:
            case ev.ModelRequested():
                model_of[p.request_id] = p.model
            case ev.ModelResponded():
                calls = stats.models[p.model or model_of.get(p.request_id, "?")]
                calls.calls += 1
                calls.latencies.append(p.latency_ms)
            case ev.ModelFailed():
                calls = stats.models[model_of.get(p.request_id, "?")]
                calls.calls += 1
                calls.failures += 1
                calls.latencies.append(p.latency_ms)
            case ev.ToolCompleted():
                stats.tools[p.name].calls += 1
                stats.tools[p.name].latencies.append(p.latency_ms)
            case ev.ToolFailed():
                tool = stats.tools[p.name]
                tool.calls += 1
                tool.failures += 1
                tool.latencies.append(p.latency_ms)
            case ev.RetryScheduled():
                if p.target == "tool":
                    stats.tool_retries += 1
                else:
                    stats.model_retries += 1
            case ev.EvalGraded():
                stats.evals_graded += 1
                stats.evals_passed += p.passed
            case ev.FeedbackGiven():
                stats.feedback += 1
                if p.score is not None:
                    stats.feedback_scores.append(p.score)


def _matches(events: Sequence[ev.Event], since_ms: int | None, agent: str | None, model: str | None) -> bool:
    if not events or not isinstance(events[0].payload, ev.SessionStarted):
        return False
    started = events[0].payload
    if since_ms is not None and events[0].time < since_ms:
        return False
    if agent is not None and started.agent != agent:
        return False
    if model is not None and started.model != model and not any(
            isinstance(e.payload, ev.ModelRequested) and e.payload.model == model for e in events):
        return False
    return True


def compute(log: Log, *, since_ms: int | None = None, agent: str | None = None, model: str | None = None,
            sessions: Iterable[str] | None = None) -> Stats:
    """The figures over the log's sessions (those started at or after `since_ms`, of `agent`,
    that used `model`; or the `sessions` named)."""
    stats = Stats()
    ids = list(sessions) if sessions is not None else [i.session_id for i in log.sessions()
                                                       if since_ms is None or i.updated_ms >= since_ms]
    for sid in ids:
        events = log.read(sid)
        if _matches(events, since_ms, agent, model):
            add_session(stats, events)
    return stats


def parse_since(text: str, now_ms: int) -> int:
    """`30m`, `2h`, `7d`, `90s` before `now_ms` → a time in ms; ValueError names the problem."""
    units = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
    text = text.strip()
    number, unit = text[:-1], text[-1:].lower()
    if unit not in units or not number.replace(".", "", 1).isdigit():
        raise ValueError(f"--since {text!r}: a duration such as 90s, 30m, 2h, 7d or 1w")
    return now_ms - int(float(number) * units[unit])
