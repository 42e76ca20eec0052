"""`loopstream trace`, `stats`, `eval` and `feedback`: traces, figures, evaluations and a
person's judgement, all read from (and written to) the log (loopstream.observe)."""
from __future__ import annotations

import json
import secrets
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Optional

import typer

from loopstream.cli import output
from loopstream.cli.common import BusOpt, DbOpt, SessionArg, UserError, reader, resolve, writer
from loopstream.core import events as ev
from loopstream.observe.feedback import FeedbackError, give_feedback
from loopstream.observe.stats import compute, parse_since
from loopstream.observe.suite import SuiteError, load_suite
from loopstream.runtime.assembly import open_model
from loopstream.runtime.decisions import person

OtlpOpt = Annotated[str, typer.Option("--otlp", envvar="LOOPSTREAM_OTLP",
                                      help="OTLP/HTTP receiver, e.g. http://127.0.0.1:6006 (/v1/traces is added).")]


def trace(
    session: SessionArg,
    otlp: OtlpOpt,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Tail a live session: send each span as it "
                                         "ends, until the session ends.")] = False,
    project: Annotated[str, typer.Option(help="The receiver's project (resource openinference.project.name).")]
    = "loopstream",
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Send a session's trace (derived from its events: a span per session, step, model call,
    tool call, retry, approval, compaction, with gen_ai.* attributes) to an OTLP/HTTP
    receiver. Span ids derive from the events, so sending it again changes nothing."""
    try:
        from loopstream.observe import otlp as otlp_mod
    except ImportError:
        raise UserError("`loopstream trace` needs the [otel] extra: pip install 'loopstream[otel]'") from None
    log = reader(bus, db)
    sid = resolve(log, session)
    try:
        sink = otlp_mod.exporter(otlp)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        done = (otlp_mod.follow_session(log, sid, sink, project) if follow
                else otlp_mod.export_session(log, sid, sink, project))
    except otlp_mod.ExportError as exc:
        raise UserError(f"{otlp_mod.traces_url(otlp)}: {exc}") from None
    finally:
        sink.shutdown()
    output.answer(f"sent {done.spans} spans of session {sid} ({done.status}) to {otlp_mod.traces_url(otlp)}")


def stats(
    since: Annotated[Optional[str], typer.Option(help="Only sessions of the last 90s, 30m, 2h, 7d, 1w.",
                                                 show_default=False)] = None,
    agent: Annotated[Optional[str], typer.Option(help="Only sessions of this agent.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(help="Only sessions that called this model.",
                                                 show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as one JSON object.")] = False,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Figures over the log: sessions by status, steps, tokens, cost, latency p50/p95/p99 of
    model calls (per model) and tool calls (per tool), failure and retry rates, eval grades
    and feedback."""
    log = reader(bus, db)
    try:
        since_ms = parse_since(since, ev.now_ms()) if since is not None else None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    figures = compute(log, since_ms=since_ms, agent=agent, model=model).as_dict()
    if as_json:
        output.answer(json.dumps(figures, sort_keys=True))
        return
    status = ", ".join(f"{k} {v}" for k, v in figures["by_status"].items()) or "none"
    cost = f"${figures['cost_usd']:.4f} ({figures['priced_sessions']} priced)" if figures["priced_sessions"] else "-"
    output.table(["figure", "value"], [
        ("sessions", f"{figures['sessions']} ({status})"), ("steps", figures["steps"]),
        ("tokens", f"{figures['input_tokens']} in, {figures['output_tokens']} out"), ("cost", cost),
        ("model failure rate", f"{figures['model_failure_rate']:.1%} ({figures['model_retries']} retries)"),
        ("tool error rate", f"{figures['tool_error_rate']:.1%} ({figures['tool_retries']} retries)"),
        ("eval grades", f"{figures['evals_graded']} ({figures['eval_pass_rate']:.1%} passed)"),
        ("feedback", f"{figures['feedback']}" + (f" (mean score {figures['mean_feedback_score']:g})"
                                                   if figures["mean_feedback_score"] is not None else "")),
    ])
    for title, rows in (("model", figures["models"]), ("tool", figures["tools"])):
        if rows:
            output.table([title, "calls", "failed", "p50 ms", "p95 ms", "p99 ms"],
                         [(name, r["calls"], f"{r['failure_rate']:.1%}", _ms(r["p50_ms"]), _ms(r["p95_ms"]),
                           _ms(r["p99_ms"])) for name, r in rows.items()])


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def eval_suite(
    suite_file: Annotated[Path, typer.Argument(metavar="SUITE", help="The suite file (TOML).", show_default=False)],
    model: Annotated[Optional[str], typer.Option(envvar="LOOPSTREAM_MODEL", show_default=False,
                                                 help="Model for variants that name none.")] = None,
    provider: Annotated[Optional[str], typer.Option(envvar="LOOPSTREAM_PROVIDER", show_default=False,
                                                    help="Provider for variants that name none.")] = None,
    base_url: Annotated[Optional[str], typer.Option(envvar="OPENAI_BASE_URL", show_default=False,
                                                    help="OpenAI-compatible server.")] = None,
    judge_model: Annotated[Optional[str], typer.Option(help="Model of the judge graders (default: --model).",
                                                       show_default=False)] = None,
    run_id: Annotated[Optional[str], typer.Option(help="Continue this run (its unfinished trials); default: "
                                                  "a new run.", show_default=False)] = None,
    ab: Annotated[Optional[str], typer.Option("--ab", metavar="A,B", show_default=False,
                                              help="A/B by fork: run each case as variant A, fork its session "
                                              "after --ab-at with variant B, grade both, say where they diverged.")]
    = None,
    ab_at: Annotated[int, typer.Option("--ab-at", min=0, help="The event after which B forks from A "
                                       "(1: right after the goal).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Run an eval suite: every case as a real session per variant and trial, graded; grades
    are EvalGraded events in each session. Prints pass rates with a 95 % Wilson interval.
    Exit 0 when it ran (whatever the pass rate)."""
    from loopstream.observe.evals import run_ab, run_suite

    try:
        suite = load_suite(suite_file)
    except SuiteError as exc:
        raise UserError(str(exc)) from None
    run = run_id or secrets.token_hex(4)
    log = writer(bus, db)
    with ExitStack() as stack:
        opened: dict[tuple, object] = {}

        def providers(variant):
            key = (variant.agent.get("provider", provider), variant.agent.get("model", model))
            if key not in opened:
                opened[key] = stack.enter_context(open_model(key[0], key[1], base_url))
            return opened[key]

        judge = None
        if any(g.kind == "judge" for c in suite.cases for g in c.graders):
            judge = stack.enter_context(open_model(provider, judge_model or model, base_url))

        def progress(t) -> None:
            output.note(f"{t.variant} {t.case_id} #{t.trial}: {'PASS' if t.passed else 'FAIL'} "
                        f"({t.status}, session {t.session_id})")

        def ab_progress(c) -> None:
            output.note(f"{c.case_id} #{c.trial}: {c.a.variant} {'PASS' if c.a.passed else 'FAIL'} "
                        f"({c.a.session_id}), {c.b.variant} {'PASS' if c.b.passed else 'FAIL'} ({c.b.session_id})"
                        + (f"; diverged at {c.diverged}" if c.diverged else "; identical"))

        cases = []
        try:
            if ab is not None:
                names = [n.strip() for n in ab.split(",")]
                if len(names) != 2 or not all(names) or names[0] == names[1]:
                    raise UserError(f"--ab {ab!r}: two different variant names, e.g. --ab terse,use-tools")
                report, cases = run_ab(log, suite, providers, names[0], names[1], run_id=run, at_seq=ab_at,
                                       judge=judge, on_case=None if as_json else ab_progress)
            else:
                report = run_suite(log, suite, providers, run_id=run, judge=judge,
                                   on_trial=None if as_json else progress)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    data = report.as_dict()
    if cases:
        data["ab"] = [{"case": c.case_id, "trial": c.trial, "a": c.a.session_id, "b": c.b.session_id,
                       "fork_at": c.at_seq, "winner": c.winner, "diverged": c.diverged} for c in cases]
    if as_json:
        output.answer(json.dumps(data, sort_keys=True))
        return
    output.table(["variant", "passed", "pass rate", "95% CI", "failed sessions", "tokens in/out", "median ms"],
                 [(v["variant"], f"{v['passed']}/{v['trials']}", f"{v['pass_rate']:.0%}",
                   f"{v['ci95'][0]:.0%}-{v['ci95'][1]:.0%}", v["failed_sessions"],
                   f"{v['input_tokens']}/{v['output_tokens']}", v["median_latency_ms"]) for v in data["variants"]])
    if cases:
        wins = {v["variant"]: sum(c.winner == v["variant"] for c in cases) for v in data["variants"]}
        output.answer("A/B: " + ", ".join(f"{k} wins {n}" for k, n in wins.items())
                      + f", {sum(not c.winner for c in cases)} ties (compare two with `loopstream diff A B`)")
    output.note(f"suite {suite.name}, run {run}: open a trial with `loopstream show SESSION`")


def feedback(
    session: SessionArg,
    score: Annotated[Optional[float], typer.Option(help="A score (e.g. 0..1, or -1/+1).", show_default=False)] = None,
    comment: Annotated[str, typer.Option(help="What you think of the session.")] = "",
    by: Annotated[Optional[str], typer.Option(help="Who gives it (default: your user name).",
                                              show_default=False)] = None,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Record your score and/or comment on an ended session (a FeedbackGiven event)."""
    log = writer(bus, db)
    sid = resolve(log, session)
    who = by or person().removeprefix("person:")
    try:
        give_feedback(log, sid, who, score, comment)
    except FeedbackError as exc:
        raise UserError(str(exc)) from None
    output.answer(f"feedback recorded on session {sid}")
