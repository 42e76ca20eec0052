"""The eval graders: each takes a finished session's answer (and state) and says pass or
fail, a score in 0..1 and why. A grader that breaks (a Python grader raising, a judge model
down) fails its case with the reason; it never stops the suite."""
from __future__ import annotations

import importlib
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from loopstream.core.state import SessionState
from loopstream.observe.suite import Grader
from loopstream.providers.base import Message, Provider, ProviderError

JUDGE_PROMPT = ("You grade an AI assistant's answer against a rubric. Reply with PASS or FAIL as the first "
                "word, then one short sentence saying why.")


@dataclass(frozen=True)
class Verdict:
    passed: bool
    score: float
    detail: str


def _norm(text: str, on: bool) -> str:
    return " ".join(text.split()).casefold() if on else text.strip()


def grade(grader: Grader, goal: str, state: SessionState, judge: Provider | None = None) -> Verdict:
    """What `grader` says of the session `state` (its answer; "" if it did not finish)."""
    answer = state.answer or ""
    o = grader.options
    try:
        match grader.kind:
            case "exact":
                ok = _norm(answer, o.get("normalize", True)) == _norm(str(o["value"]), o.get("normalize", True))
                return Verdict(ok, float(ok), f"{_short(answer)!r} {'==' if ok else '!='} {_short(str(o['value']))!r}")
            case "contains":
                ok = _norm(str(o["value"]), o.get("normalize", True)) in _norm(answer, o.get("normalize", True))
                return Verdict(ok, float(ok), f"{'contains' if ok else 'lacks'} {_short(str(o['value']))!r}")
            case "regex":
                ok = re.search(o["pattern"], answer) is not None
                return Verdict(ok, float(ok), f"/{_short(o['pattern'])}/ {'matches' if ok else 'does not match'}")
            case "jsonschema":
                try:
                    doc = json.loads(answer)
                except ValueError as exc:
                    return Verdict(False, 0.0, f"the answer is not JSON: {exc}")
                errors = sorted(jsonschema.Draft202012Validator(o["schema"]).iter_errors(doc), key=str)
                return Verdict(not errors, float(not errors), f"schema: {_short(errors[0].message)}" if errors
                               else "valid against the schema")
            case "python":
                return _python(o, answer, state)
            case "judge":
                return _judge(o["rubric"], goal, answer, judge)
    except Exception as exc:  # a grader's own failure fails the case, with the reason
        return Verdict(False, 0.0, f"the grader failed: {type(exc).__name__}: {_short(str(exc))}")
    raise ValueError(f"unknown grader kind {grader.kind!r}")


def load_function(options: dict[str, Any]) -> Callable[..., Any]:
    """The Python grader's function: `file.py:name` (the file beside the suite) or `module:name`."""
    module, _, name = options["function"].partition(":")
    if "file" in options:
        path = Path(options["file"])
        spec = importlib.util.spec_from_file_location(f"loopstream_eval_{path.stem}", path)
        if spec is None or spec.loader is None or not path.is_file():
            raise FileNotFoundError(f"no grader file {path}")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(module)
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise AttributeError(f"{options['function']}: no function {name!r}")
    return fn


def _python(options: dict[str, Any], answer: str, state: SessionState) -> Verdict:
    """A function(answer, state) returning a bool, a score in 0..1 (passes at ≥ 0.5), or
    (passed, detail)."""
    out = load_function(options)(answer, state)
    if isinstance(out, tuple):
        ok, detail = bool(out[0]), str(out[1]) if len(out) > 1 else ""
        return Verdict(ok, float(ok), _short(detail))
    if isinstance(out, bool):
        return Verdict(out, float(out), f"{options['function']} → {out}")
    score = min(1.0, max(0.0, float(out)))
    return Verdict(score >= 0.5, score, f"{options['function']} → {score:g}")


def _judge(rubric: str, goal: str, answer: str, judge: Provider | None) -> Verdict:
    if judge is None:
        return Verdict(False, 0.0, "no judge model")
    messages = [Message(role="system", content=JUDGE_PROMPT),
                Message(role="user", content=f"Rubric: {rubric}\n\nTask: {goal}\n\nAnswer: {answer}\n\n"
                                             "PASS or FAIL?")]
    try:
        reply = judge.complete(messages, [])
    except ProviderError as exc:
        return Verdict(False, 0.0, f"the judge model failed: {_short(str(exc))}")
    text = reply.text.strip()
    word = re.match(r"[\W_]*(\w+)", text)
    verdict = word.group(1).upper() if word else ""
    return Verdict(verdict == "PASS", float(verdict == "PASS"), f"judge: {_short(text, 300)}")


def _short(text: str, width: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
