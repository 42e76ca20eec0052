"""`loopstream eval SUITE.toml`: run every case of a suite as real sessions (per variant and
trial), grade each ended session, and record the grades as EvalGraded events in the
session's own log, so a report is a projection of the log and every trial can be opened
with `show` / `replay`.

A trial's session id derives from (suite, run id, variant, case, trial): the same run id
run again continues its unfinished trials and re-grades nothing (the grades already in the
log are read back), so an interrupted eval resumes where it stopped.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from loopstream.core import events as ev
from loopstream.core.fsm import ANNOTATIONS
from loopstream.core.log import Log
from loopstream.core.policy import parse_policy
from loopstream.core.state import SessionState, apply, fold
from loopstream.observe.graders import Verdict, grade
from loopstream.observe.suite import Case, Suite, Variant
from loopstream.providers.base import Provider
from loopstream.replay.diff import diff
from loopstream.replay.fork import batch_bounds, fork
from loopstream.runtime.assembly import DEFAULT_SYSTEM_PROMPT, build_runtime
from loopstream.runtime.inline import Runtime, SessionConfig
from loopstream.tools.builtin import default_registry
from loopstream.tools.registry import ToolRegistry

EVAL_ACTOR = "eval"


def wilson(passed: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a pass rate (95 % by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = passed / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Trial:
    variant: str
    case_id: str
    trial: int
    session_id: str
    status: str
    passed: bool
    grades: list[ev.EvalGraded]
    input_tokens: int
    output_tokens: int
    latency_ms: int  # the session's first to last event (annotations aside)
    answer: str


@dataclass
class VariantReport:
    name: str
    trials: list[Trial] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(t.passed for t in self.trials)

    def as_dict(self) -> dict:
        n = len(self.trials)
        low, high = wilson(self.passed, n)
        lat = sorted(t.latency_ms for t in self.trials)
        return {"variant": self.name, "trials": n, "passed": self.passed,
                "pass_rate": round(self.passed / n, 4) if n else 0.0, "ci95": [round(low, 4), round(high, 4)],
                "failed_sessions": sum(t.status != "done" for t in self.trials),
                "input_tokens": sum(t.input_tokens for t in self.trials),
                "output_tokens": sum(t.output_tokens for t in self.trials),
                "median_latency_ms": lat[len(lat) // 2] if lat else None}


@dataclass
class Report:
    suite: str
    run_id: str
    variants: list[VariantReport]

    def as_dict(self) -> dict:
        return {"suite": self.suite, "run_id": self.run_id, "variants": [v.as_dict() for v in self.variants],
                "trials": [{"variant": t.variant, "case": t.case_id, "trial": t.trial, "session": t.session_id,
                            "status": t.status, "passed": t.passed, "answer": t.answer,
                            "grades": [{"grader": g.grader, "kind": g.kind, "passed": g.passed, "score": g.score,
                                        "detail": g.detail} for g in t.grades]}
                           for v in self.variants for t in v.trials]}


def session_config(suite: Suite, variant: Variant, registry: ToolRegistry, provider: Provider) -> SessionConfig:
    """The SessionConfig of a variant: the suite's [agent] with the variant's keys over it."""
    a = variant.agent
    where = f"{suite.path}: variant {variant.name!r}"
    tools = a.get("tools", registry.names())
    unknown = sorted(set(tools) - set(registry.names())) if isinstance(tools, list) else ["(not a list)"]
    if unknown:
        raise ValueError(f"{where}: tools: unknown {', '.join(map(str, unknown))} (known: {', '.join(registry.names())})")
    return SessionConfig(provider=getattr(provider, "name", "scripted"), model=getattr(provider, "model", "") or "",
                         tools=list(tools), system_prompt=a.get("system_prompt", DEFAULT_SYSTEM_PROMPT),
                         agent=a.get("agent", f"eval-{variant.name}"), max_steps=int(a.get("max_steps", 8)),
                         policy=parse_policy(a.get("policy", {}), f"{where}: policy"))


def trial_key(suite: Suite, run_id: str, variant: str, case_id: str, trial: int) -> str:
    return "\x1f".join(["eval", suite.name, run_id, variant, case_id, str(trial)])


def run_trial(runtime: Runtime, suite: Suite, run_id: str, variant: Variant, case: Case, trial: int,
              config: SessionConfig, judge: Provider | None) -> Trial:
    """Run (or continue) one trial's session, grade it once, and read the trial back from the log."""
    key = trial_key(suite, run_id, variant.name, case.id, trial)
    sid = runtime.start_session(case.goal, config, idempotency_key=key, actor=EVAL_ACTOR)
    state = runtime.run_session(sid)
    if not state.terminal:  # waits for a person: an eval has none, so it ends here
        runtime.writer.record(sid, [ev.SessionCancelled(reason="eval: the session waits for a person")], EVAL_ACTOR)
    events = runtime.log.read(sid)
    if not _grades(events, suite.name, variant.name):
        state = fold(events)
        verdicts = [(g, grade(g, case.goal, state, judge)) for g in case.graders]
        runtime.writer.record(sid, [_graded(suite, variant, case, trial, g.name, g.kind, v) for g, v in verdicts],
                              EVAL_ACTOR, key=run_id)
        events = runtime.log.read(sid)
    return trial_from_log(events, suite.name, variant.name, case.id, trial)


def _graded(suite: Suite, variant: Variant, case: Case, trial: int, name: str, kind: str, v: Verdict) -> ev.EvalGraded:
    return ev.EvalGraded(suite=suite.name, case_id=case.id, variant=variant.name, trial=trial, grader=name, kind=kind,
                         passed=v.passed, score=v.score, detail=v.detail)


def _grades(events: Sequence[ev.Event], suite: str, variant: str) -> list[ev.EvalGraded]:
    return [e.payload for e in events if isinstance(e.payload, ev.EvalGraded)
            and e.payload.suite == suite and e.payload.variant == variant]


def trial_from_log(events: Sequence[ev.Event], suite: str, variant: str, case_id: str, trial: int) -> Trial:
    """A trial as its session's events say: status, answer, tokens, latency, grades."""
    state: SessionState = fold(events)
    grades = _grades(events, suite, variant)
    times = [e.time for e in events if e.type not in ANNOTATIONS]
    return Trial(variant, case_id, trial, state.session_id, state.status,
                 bool(grades) and all(g.passed for g in grades), grades, state.input_tokens, state.output_tokens,
                 max(times) - min(times) if times else 0, state.answer or "")


def run_suite(log: Log, suite: Suite, providers: Callable[[Variant], Provider], *, run_id: str,
              judge: Provider | None = None, registry: ToolRegistry | None = None,
              on_trial: Callable[[Trial], None] | None = None) -> Report:
    """Every (variant, case, trial) as a session of `log`, graded; the report, read from the log."""
    registry = registry or default_registry()
    report = Report(suite.name, run_id, [])
    for variant in suite.variants:
        provider = providers(variant)
        runtime = build_runtime(log, provider, registry)
        config = session_config(suite, variant, registry, provider)
        vr = VariantReport(variant.name)
        for case in suite.cases:
            for trial in range(1, suite.trials + 1):
                t = run_trial(runtime, suite, run_id, variant, case, trial, config, judge)
                vr.trials.append(t)
                if on_trial is not None:
                    on_trial(t)
        report.variants.append(vr)
    return report


@dataclass
class ABCase:
    """One case of an A/B run: A's session, B's fork of it, their grades and where they diverged."""

    case_id: str
    trial: int
    a: Trial
    b: Trial
    at_seq: int
    diverged: str  # "" when the two sessions agree to the end

    @property
    def winner(self) -> str:
        return "" if self.a.passed == self.b.passed else (self.a.variant if self.a.passed else self.b.variant)


def run_ab(log: Log, suite: Suite, providers: Callable[[Variant], Provider], a_name: str, b_name: str, *,
           run_id: str, at_seq: int = 1, judge: Provider | None = None, registry: ToolRegistry | None = None,
           on_case: Callable[[ABCase], None] | None = None) -> tuple[Report, list[ABCase]]:
    """A/B by fork: each case runs as variant A; its session is forked after event `at_seq`
    (default 1: right after the goal, so both share the prefix) with B's model, prompt, tools
    and step budget, and the fork continues under B. Both are graded; the cases say where the
    two diverged (`loopstream diff`)."""
    registry = registry or default_registry()
    variants = {v.name: v for v in suite.variants}
    for name in (a_name, b_name):
        if name not in variants:
            raise ValueError(f"{suite.path}: no variant {name!r} (variants: {', '.join(variants)})")
    va, vb = variants[a_name], variants[b_name]
    pa, pb = providers(va), providers(vb)
    ra, rb = build_runtime(log, pa, registry), build_runtime(log, pb, registry)
    ca, cb = session_config(suite, va, registry, pa), session_config(suite, vb, registry, pb)
    report = Report(suite.name, run_id, [VariantReport(a_name), VariantReport(b_name)])
    cases: list[ABCase] = []
    for case in suite.cases:
        for trial in range(1, suite.trials + 1):
            ta = run_trial(ra, suite, run_id, va, case, trial, ca, judge)
            events = log.read(ta.session_id)
            last_live, folded = 0, SessionState()
            for e in events:  # the fork point must leave the session live
                if not apply(folded, e).terminal:
                    last_live = e.seq
            _, end = batch_bounds(events, min(at_seq, last_live))
            child = ev.derived_id("ab", trial_key(suite, run_id, b_name, case.id, trial))[:16]
            if not log.next_seq(child):
                fork(log, ta.session_id, end, model=cb.model, system_prompt=cb.system_prompt, tools=cb.tools,
                     max_steps=cb.max_steps, reason=f"eval {suite.name} A/B: variant {b_name}",
                     registry=registry, child_session_id=child, acknowledge_side_effects=True, actor=EVAL_ACTOR)
            tb = _continue(rb, suite, run_id, vb, case, trial, child, judge)
            d = diff(log, ta.session_id, tb.session_id)
            where = "" if d.divergence is None else (
                f"A: {d.divergence.a} | B: {d.divergence.b}")
            ab = ABCase(case.id, trial, ta, tb, end, where)
            cases.append(ab)
            report.variants[0].trials.append(ta)
            report.variants[1].trials.append(tb)
            if on_case is not None:
                on_case(ab)
    return report, cases


def _continue(runtime: Runtime, suite: Suite, run_id: str, variant: Variant, case: Case, trial: int, sid: str,
              judge: Provider | None) -> Trial:
    """Run a forked session to its end and grade it once (as `run_trial` does a new one)."""
    state = runtime.run_session(sid)
    if not state.terminal:
        runtime.writer.record(sid, [ev.SessionCancelled(reason="eval: the session waits for a person")], EVAL_ACTOR)
    events = runtime.log.read(sid)
    if not _grades(events, suite.name, variant.name):
        state = fold(events)
        runtime.writer.record(sid, [_graded(suite, variant, case, trial, g.name, g.kind, grade(g, case.goal, state, judge))
                                    for g in case.graders], EVAL_ACTOR, key=run_id)
        events = runtime.log.read(sid)
    return trial_from_log(events, suite.name, variant.name, case.id, trial)
