"""Replay: rebuild a session from its stored bytes, verify its chain, and lay out what
happened (steps, model calls, tool calls, errors, totals) without calling anything.

Model replies and tool results are events, so a replay decodes and folds; it makes no
model call and no tool call (nothing here imports a provider or runs a processor).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from loopstream.core import events as ev
from loopstream.core.codec import decode_prefix
from loopstream.core.describe import call_text, short, summary
from loopstream.core.fsm import IllegalTransition
from loopstream.core.log import Log, SessionNotFound
from loopstream.core.state import SequenceGap, SessionState, apply
from loopstream.replay.chain import ChainReport, check_complete, verify_raw


@dataclass
class ModelCall:
    step: int
    attempt: int
    model: str
    request_id: str
    request_seq: int
    result_seq: int | None = None  # None: still in flight where the replay stops
    ok: bool | None = None
    latency_ms: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    mode: str = ""
    finish_reason: str = ""
    text: str = ""
    tool_calls: list[str] = field(default_factory=list)  # "name(args)"
    error_kind: str = ""
    error: str = ""
    retryable: bool | None = None

    @property
    def seq(self) -> int:
        return self.request_seq


@dataclass
class ToolCallView:
    call_id: str
    name: str
    arguments_json: str
    step: int
    request_seq: int
    result_seq: int | None = None
    ok: bool | None = None
    result: str = ""
    error_kind: str = ""
    error: str = ""
    latency_ms: int = 0

    @property
    def seq(self) -> int:
        return self.request_seq


@dataclass
class Note:
    """Anything else on the timeline: start, goal, messages, retries, fallbacks, forks, the end."""

    seq: int
    type: str
    text: str


@dataclass
class StepView:
    step: int
    model_calls: list[ModelCall] = field(default_factory=list)
    tool_calls: list[ToolCallView] = field(default_factory=list)


@dataclass
class Totals:
    events: int = 0
    steps: int = 0
    model_calls: int = 0
    model_failures: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    model_latency_ms: int = 0
    tool_latency_ms: int = 0
    wall_ms: int = 0


@dataclass
class ReplayReport:
    session_id: str
    to_seq: int | None
    chain: ChainReport
    state: SessionState  # folded from the verified events
    timeline: list[ModelCall | ToolCallView | Note]  # in seq order
    steps: list[StepView]
    errors: list[Note]
    totals: Totals
    forked_from: ev.SessionForked | None = None
    fold_error: str | None = None  # an event that would not decode or fold
    fold_error_seq: int | None = None
    model_calls_made: int = 0  # always 0: what the replay itself called
    tool_calls_made: int = 0
    events: list[ev.Event] = field(default_factory=list, repr=False)  # decoded, verified

    @property
    def ok(self) -> bool:
        return self.chain.ok and self.fold_error is None

    @property
    def first_bad_seq(self) -> int | None:
        return self.chain.first_bad_seq if not self.chain.ok else self.fold_error_seq


# -- replaying ---------------------------------------------------------------------------


def replay(log: Log, session_id: str, to_seq: int | None = None) -> ReplayReport:
    """Replay `session_id` from `log` up to `to_seq` (inclusive; None: the whole session)."""
    if to_seq is not None and to_seq < 0:
        raise ValueError(f"to_seq must be >= 0, got {to_seq}")
    raw = log.read_raw(session_id, 0, to_seq)
    if not raw:
        raise SessionNotFound(session_id)
    chain = check_complete(log, session_id, verify_raw(raw, session_id), len(raw), to_seq)
    return replay_raw(raw, session_id, to_seq, chain=chain)


def replay_raw(
    raw: Sequence[bytes], session_id: str = "", to_seq: int | None = None, *, chain: ChainReport | None = None
) -> ReplayReport:
    """Replay stored event bytes (from a log, an export file or a test fixture).

    Only events the chain vouches for are folded: if it breaks at seq k, the report
    shows the session up to k-1 and names k."""
    if to_seq is not None:
        raw = raw[: to_seq + 1]
    chain = chain or verify_raw(raw, session_id)
    good = raw if chain.ok else raw[: chain.first_bad_seq]
    events, state, fold_error, fold_error_seq = rebuild(good)
    report = _timeline(events, state)
    report.session_id = session_id or state.session_id
    report.to_seq, report.chain = to_seq, chain
    report.fold_error, report.fold_error_seq = fold_error, fold_error_seq
    report.events = events
    return report


def rebuild(raw: Sequence[bytes]) -> tuple[list[ev.Event], SessionState, str | None, int | None]:
    """Decode and fold (the replay's hot path): events, state, and the first failure if any."""
    state = SessionState()
    events, codec_error = decode_prefix(raw)
    apply_ = apply  # a local: looked up once, not per event
    for i, event in enumerate(events):
        try:
            apply_(state, event)
        except (IllegalTransition, SequenceGap) as exc:
            return events[:i], state, f"{type(exc).__name__}: {exc}", i
    if codec_error is not None:
        return events, state, f"CodecError: {codec_error}", len(events)
    return events, state, None, None


def _timeline(events: list[ev.Event], state: SessionState) -> ReplayReport:
    timeline: list[ModelCall | ToolCallView | Note] = []
    steps: dict[int, StepView] = {}
    errors: list[Note] = []
    totals = Totals(events=len(events))
    open_models: dict[str, ModelCall] = {}
    open_tools: dict[str, ToolCallView] = {}
    forked_from = None
    step = 0

    def step_view(n: int) -> StepView:
        if n not in steps:
            steps[n] = StepView(n)
        return steps[n]

    for e in events:
        p = e.payload
        match p:
            case ev.SessionForked():
                forked_from = p
                timeline.append(Note(e.seq, e.type, summary(p)))
            case ev.ModelRequested():
                step = p.step
                call = ModelCall(step=p.step, attempt=p.attempt, model=p.model, request_id=p.request_id,
                                 request_seq=e.seq)
                open_models[p.request_id] = call
                step_view(p.step).model_calls.append(call)
                timeline.append(call)
                totals.model_calls += 1
            case ev.ModelResponded():
                call = open_models.pop(p.request_id, None) or _orphan_model(e, step, p.request_id)
                call.result_seq, call.ok = e.seq, True
                call.latency_ms, call.mode, call.finish_reason = p.latency_ms, p.mode, p.finish_reason
                call.input_tokens, call.output_tokens = p.input_tokens, p.output_tokens
                call.text = p.text
                call.tool_calls = [call_text(c.name, c.arguments_json) for c in p.tool_calls]
                if p.model:
                    call.model = p.model
                totals.model_latency_ms += p.latency_ms
            case ev.ModelFailed():
                call = open_models.pop(p.request_id, None) or _orphan_model(e, step, p.request_id)
                call.result_seq, call.ok = e.seq, False
                call.latency_ms, call.error_kind, call.error = p.latency_ms, p.error_kind, p.message
                call.retryable = p.retryable
                totals.model_failures += 1
                totals.model_latency_ms += p.latency_ms
                errors.append(Note(e.seq, e.type, summary(p)))
            case ev.ToolRequested():
                tool = ToolCallView(call_id=p.call_id, name=p.name, arguments_json=p.arguments_json,
                                    step=p.step, request_seq=e.seq)
                open_tools[p.call_id] = tool
                step_view(p.step).tool_calls.append(tool)
                timeline.append(tool)
                totals.tool_calls += 1
            case ev.ToolCompleted():
                tool = open_tools.pop(p.call_id, None)
                if tool is not None:
                    tool.result_seq, tool.ok, tool.result, tool.latency_ms = e.seq, True, p.result, p.latency_ms
                totals.tool_latency_ms += p.latency_ms
            case ev.ToolFailed():
                tool = open_tools.pop(p.call_id, None)
                if tool is not None:
                    tool.result_seq, tool.ok, tool.latency_ms = e.seq, False, p.latency_ms
                    tool.error_kind, tool.error = p.error_kind, p.message
                totals.tool_errors += 1
                totals.tool_latency_ms += p.latency_ms
                errors.append(Note(e.seq, e.type, summary(p)))
            case ev.ToolCallReviewed():
                timeline.append(Note(e.seq, "review", summary(p)))
            case ev.GuardrailTripped() if p.call_id is not None and p.call_id in open_tools:
                tool = open_tools.pop(p.call_id)  # the call was blocked: this settles it
                tool.result_seq, tool.ok = e.seq, False
                tool.error_kind, tool.error = f"blocked by guardrail {p.rule}", p.message
                errors.append(Note(e.seq, e.type, f"{tool.name} blocked by guardrail {p.rule}: {p.message}"))
            case ev.SessionFailed():
                timeline.append(Note(e.seq, e.type, summary(p)))
                errors.append(Note(e.seq, e.type, summary(p)))
            case _:  # start, goal, messages, retries, fallbacks, the end, and types added later
                timeline.append(Note(e.seq, e.type, summary(p)))
    totals.steps = len(steps)
    totals.input_tokens, totals.output_tokens = state.input_tokens, state.output_tokens
    if events:
        totals.wall_ms = events[-1].time - events[0].time
    return ReplayReport(
        session_id=state.session_id, to_seq=None, chain=ChainReport(state.session_id, "empty", 0),
        state=state, timeline=timeline, steps=[steps[k] for k in sorted(steps)], errors=errors,
        totals=totals, forked_from=forked_from,
    )


def _orphan_model(e: ev.Event, step: int, request_id: str) -> ModelCall:
    return ModelCall(step=step, attempt=0, model="?", request_id=request_id, request_seq=e.seq)


# -- rendering ---------------------------------------------------------------------------


def render(report: ReplayReport, *, width: int = 100, max_lines: int | None = None) -> str:
    """The report as plain text (fine under `rich`): header, chain, timeline, errors, totals."""
    st, t = report.state, report.totals
    last = st.seq
    span = f"seq 0..{last} ({last + 1} events)" if last >= 0 else "no events"
    lines = [
        f"replay of session {report.session_id}: {span}"
        + (f", stopped at --to {report.to_seq}" if report.to_seq is not None else "")
        + f"; the replay made {report.model_calls_made} model calls and {report.tool_calls_made} tool calls",
        report.chain.describe(),
    ]
    if report.fold_error:
        lines.append(f"FOLD FAILED at seq {report.fold_error_seq}: {report.fold_error}")
    body: list[str] = []
    current_step = None
    for item in report.timeline:
        if isinstance(item, ModelCall | ToolCallView) and item.step != current_step:
            current_step = item.step
            body.append(f"step {item.step}")
        body.append(_line(item, width))
    if max_lines is not None and len(body) > max_lines:
        keep = max_lines // 2
        body = body[:keep] + [f"      … {len(body) - 2 * keep} lines …"] + body[-keep:]
    lines += body
    if report.errors:
        lines.append(f"errors ({len(report.errors)}):")
        lines += [f"  seq {e.seq:>5}  {e.type}  {short(e.text, width - 30)}" for e in report.errors]
    else:
        lines.append("errors: none")
    lines.append(
        f"totals: {t.steps} steps · {t.model_calls} model calls ({t.model_failures} failed, "
        f"{t.model_latency_ms / 1000:.1f} s) · {t.tool_calls} tool calls ({t.tool_errors} failed, "
        f"{t.tool_latency_ms / 1000:.1f} s) · tokens {t.input_tokens:,} in / {t.output_tokens:,} out · "
        f"wall {t.wall_ms / 1000:.1f} s"
    )
    status = f"status: {st.status}"
    if st.answer is not None:
        status += f" · answer {short(repr(st.answer), width - 20)}"
    if st.error:
        status += f" · error {short(st.error, width - 20)}"
    lines.append(status)
    return "\n".join(lines)


def _line(item: ModelCall | ToolCallView | Note, width: int) -> str:
    if isinstance(item, Note):
        prefix = f"{item.seq:>11}  {_LABEL.get(item.type, item.type):<6} "
        return prefix + short(item.text, width - len(prefix))
    seqs = f"{item.request_seq}→{item.result_seq if item.result_seq is not None else '…'}"
    if isinstance(item, ModelCall):
        prefix = f"{seqs:>11}  model  "
        text = item.model + (f" attempt {item.attempt}" if item.attempt > 1 else "")
        if item.ok is None:
            text += " · in flight"
        elif not item.ok:
            text += (f" · FAILED {item.error_kind}: {item.error} · {item.latency_ms} ms"
                     + (" (retryable)" if item.retryable else ""))
        else:
            what = "calls " + "; ".join(item.tool_calls) if item.tool_calls else f"says {item.text!r}"
            text += (f" · {item.latency_ms} ms · {item.input_tokens}+{item.output_tokens} tok · "
                     f"{item.mode} · {what}")
        return prefix + short(text, width - len(prefix))
    prefix = f"{seqs:>11}  tool   "
    text = call_text(item.name, item.arguments_json)
    if item.ok is None:
        text += " · no result"
    elif not item.ok:
        text += f" · FAILED {item.error_kind}: {item.error} · {item.latency_ms} ms"
    else:
        text += f" → {item.result!r} · {item.latency_ms} ms"
    return prefix + short(text, width - len(prefix))


_LABEL = {
    "SessionStarted": "start", "GoalReceived": "goal", "UserMessage": "user", "SessionForked": "fork",
    "SessionFinished": "done", "SessionFailed": "FAILED", "SessionCancelled": "cancel",
    "RetryScheduled": "retry", "ModelFallback": "fallbk",
}
