"""loopstream.observe without a receiver: spans derived from the log, stats, eval suites and
their graders, feedback; on real SQLite logs with sessions run by the real driver and a
scripted model. (tests/test_observe_phoenix.py sends the spans to a real Phoenix.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loopstream.core import events as ev
from loopstream.core.fsm import IllegalTransition
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.observe.evals import run_ab, run_suite, wilson
from loopstream.observe.feedback import FeedbackError, give_feedback
from loopstream.observe.spans import session_spans, span_id, trace_id
from loopstream.observe.stats import compute, parse_since, percentile
from loopstream.observe.suite import SuiteError, load_suite
from loopstream.providers.base import ModelReply
from loopstream.providers.local import local_provider
from loopstream.providers.scripted import ScriptedProvider, scripted_from_spec
from loopstream.replay.determinism import check_determinism
from loopstream.replay.inspect import session_rows
from loopstream.runtime.writer import SessionConfig, SessionWriter
from tests.observe_sessions import adder_session, rich_session

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loopstream.cli.app", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


# -- spans ---------------------------------------------------------------------------------
def test_a_sessions_spans_nest_and_carry_gen_ai_attributes(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    sid = rich_session(db)
    with SQLiteLog(db) as log:
        events = log.read(sid)
    spans = session_spans(events)
    by_name: dict[str, list] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    root = by_name["invoke_agent default"][0]
    assert root.parent_id is None and root.trace_id == trace_id(sid) and root.span_id == span_id(sid, "session")
    assert {s.trace_id for s in spans} == {root.trace_id}
    steps = by_name["step 1"] + by_name["step 2"] + by_name["step 3"]
    assert all(s.parent_id == root.span_id for s in steps)
    chats = by_name["chat scripted:rich"]
    assert len(chats) == 4  # the failed attempt, its retry, and two more steps
    failed = [c for c in chats if c.error]
    assert len(failed) == 1 and failed[0].attributes["error.type"] == "server_error"
    ok = [c for c in chats if not c.error]
    assert all(c.attributes["gen_ai.operation.name"] == "chat" and c.attributes["gen_ai.system"] == "scripted"
               and c.attributes["gen_ai.request.model"] == "scripted:rich" for c in chats)
    assert sorted(c.attributes["gen_ai.usage.input_tokens"] for c in ok) == [30, 40, 50]
    assert all(c.attributes["gen_ai.response.finish_reasons"] for c in ok)
    step1 = by_name["step 1"][0]
    assert all(c.parent_id == step1.span_id for c in failed) and by_name["retry model"][0].parent_id == step1.span_id
    divide, add = by_name["execute_tool divide"][0], by_name["execute_tool add"][0]
    assert divide.error and divide.attributes["gen_ai.tool.name"] == "divide" and not add.error
    assert add.attributes["output.value"] == "4" and add.attributes["gen_ai.tool.call.id"].endswith("a1")
    assert root.attributes["gen_ai.usage.input_tokens"] == 120 and root.attributes["loopstream.status"] == "done"
    assert all(s.end_ns is not None and s.end_ns >= s.start_ns for s in spans)
    assert session_spans(events) == spans  # the same log, the same spans and ids


def test_a_live_sessions_open_spans_have_no_end(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    sid = rich_session(db)
    with SQLiteLog(db) as log:
        events = log.read(sid)
    cut = next(i for i, e in enumerate(events) if e.type == "ToolRequested") + 1
    spans = {s.name: s for s in session_spans(events[:cut])}
    assert spans["execute_tool divide"].end_ns is None and spans["invoke_agent default"].end_ns is None
    assert spans["chat scripted:rich"].end_ns is not None


def test_span_ids_are_stable_and_differ_per_session_and_key() -> None:
    assert span_id("s1", "session") == span_id("s1", "session") != span_id("s2", "session")
    assert trace_id("s1") != trace_id("s2") and 0 < trace_id("s1") < 2**128 and 0 < span_id("s1", "x") < 2**64


# -- stats ---------------------------------------------------------------------------------
def test_stats_over_the_log(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    rich_session(db)
    adder_session(db, 3, agent="counter")
    with SQLiteLog(db) as log:
        s = compute(log).as_dict()
        assert s["sessions"] == 2 and s["by_status"] == {"done": 2}
        assert s["steps"] == 3 + 4 and s["model_retries"] == 1
        assert s["tools"]["divide"]["failures"] == 1 and s["tools"]["add"]["calls"] == 1 + 3
        assert s["tool_error_rate"] == round(1 / 5, 4)
        assert s["models"]["scripted:rich"]["failure_rate"] == 0.25
        assert compute(log, agent="counter").as_dict()["sessions"] == 1
        assert compute(log, model="scripted:rich").as_dict()["sessions"] == 1
        assert compute(log, since_ms=ev.now_ms() + 60_000).as_dict()["sessions"] == 0
    out = cli("stats", "--db", str(db), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["sessions"] == 2
    table = cli("stats", "--db", str(db))
    assert table.returncode == 0 and "divide" in table.stdout and "p95 ms" in table.stdout
    bad = cli("stats", "--db", str(db), "--since", "yesterday")
    assert bad.returncode == 2 and "--since 'yesterday'" in bad.stderr and "Traceback" not in bad.stderr


def test_percentiles_and_durations() -> None:
    assert percentile([], 50) is None
    assert percentile([5], 99) == 5
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(1, 101)), 95) == pytest.approx(95.05)
    assert parse_since("2h", 10_000_000) == 10_000_000 - 7_200_000
    with pytest.raises(ValueError):
        parse_since("h", 0)


# -- feedback ------------------------------------------------------------------------------
def test_feedback_is_an_event_after_the_end_and_the_session_stays_done(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    sid = adder_session(db, 1)
    with SQLiteLog(db) as log:
        hostile = "<script>[red]x[/red]\x1b[2J" + "\ud800" + "y" * 100_000
        give_feedback(log, sid, "ada", 0.5, hostile)
        events = log.read(sid)
        fb = events[-1].payload
        assert isinstance(fb, ev.FeedbackGiven) and fb.score == 0.5 and fb.by == "ada"
        assert "\ud800" not in fb.comment and len(fb.comment) <= 16_000  # sanitized and capped by the writer
        assert [r.status for r in session_rows(log)] == ["done"]
        assert SessionWriter(log).load(sid).status == "done"
        assert check_determinism(log, sid).ok
        with pytest.raises(FeedbackError, match="--score or a --comment"):
            give_feedback(log, sid, "ada")
        with pytest.raises(FeedbackError, match="finite"):
            give_feedback(log, sid, "ada", float("inf"))
    out = cli("feedback", sid[:8], "--score", "1", "--comment", "[bold]fine[/bold]", "--db", str(db))
    assert out.returncode == 0, out.stderr
    shown = cli("show", sid, "--db", str(db))
    assert "FeedbackGiven" in shown.stdout and "[bold]fine[/bold]" in shown.stdout


def test_feedback_on_a_running_session_is_refused_in_one_line(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    with SQLiteLog(db) as log:
        writer = SessionWriter(log)
        sid = writer.start("wait", SessionConfig(provider="scripted", model="adder", tools=["add"]))
        with pytest.raises(FeedbackError, match="is planning: feedback is for a session that has ended"):
            give_feedback(log, sid, "ada", 1.0)
        with pytest.raises(IllegalTransition):  # the FSM refuses it too, whoever writes it
            writer.record(sid, [ev.FeedbackGiven(by="x", score=1.0)], "person:x")
    out = cli("feedback", sid, "--score", "1", "--db", str(db))
    assert out.returncode == 2 and "feedback is for a session that has ended" in out.stderr
    assert "Traceback" not in out.stderr


# -- eval suites ---------------------------------------------------------------------------
SUITE = """
name = "count"
trials = 2
[agent]
tools = ["add"]
max_steps = 5
[[variants]]
name = "two"
model = "adder:2"
[[variants]]
name = "three"
model = "adder:3"
[[cases]]
id = "reaches-two"
goal = "count to two"
graders = [
  { kind = "regex", pattern = "\\\\b2\\\\.$" },
  { kind = "contains", value = "the RESULT" },
  { kind = "python", function = "grade.py:ends_in_two", name = "py" },
  { kind = "judge", rubric = "The answer says 2." },
]
[[cases]]
id = "json"
goal = "give json"
graders = [{ kind = "jsonschema", schema = { type = "object" } }, { kind = "exact", value = "The result is 2." }]
"""


def write_suite(tmp_path: Path, text: str = SUITE) -> Path:
    (tmp_path / "grade.py").write_text("def ends_in_two(answer, state):\n"
                                       "    return answer.endswith('2.'), f'{state.step} steps'\n")
    path = tmp_path / "suite.toml"
    path.write_text(text)
    return path


def test_an_eval_runs_sessions_records_grades_and_reports_a_wilson_interval(tmp_path: Path) -> None:
    suite = load_suite(write_suite(tmp_path))
    judge = ScriptedProvider([ModelReply(text="PASS: it says 2")], model="judge")
    db = tmp_path / "log.db"
    with SQLiteLog(db) as log:
        report = run_suite(log, suite, lambda v: scripted_from_spec(v.agent["model"]), run_id="r1", judge=judge)
        data = report.as_dict()
        two, three = data["variants"]
        assert (two["variant"], two["trials"], two["passed"]) == ("two", 4, 2)  # reaches-two passes, json does not
        assert (three["passed"], three["failed_sessions"]) == (0, 0)
        assert two["ci95"] == [round(x, 4) for x in wilson(2, 4)]
        trial = next(t for t in report.variants[0].trials if t.case_id == "reaches-two")
        events = log.read(trial.session_id)
        grades = [e.payload for e in events if e.type == "EvalGraded"]
        assert [(g.grader, g.kind, g.passed) for g in grades] == [
            ("regex", "regex", True), ("contains", "contains", True), ("py", "python", True), ("judge", "judge", True)]
        assert grades[2].detail == "3 steps" and all(e.actor == "eval" for e in events[-4:])
        assert check_determinism(log, trial.session_id).ok  # graded sessions still replay
        n = sum(i.next_seq for i in log.sessions())
        again = run_suite(log, suite, lambda v: scripted_from_spec(v.agent["model"]), run_id="r1", judge=judge)
        assert sum(i.next_seq for i in log.sessions()) == n  # the same run id writes nothing twice
        assert again.as_dict()["variants"] == data["variants"]
        assert compute(log).as_dict()["evals_graded"] == 2 * 2 * (4 + 2)


def test_ab_by_fork_shares_the_prefix_grades_both_and_says_where_they_diverged(tmp_path: Path) -> None:
    suite = load_suite(write_suite(tmp_path, SUITE.replace("trials = 2", "trials = 1").replace(
        '  { kind = "judge", rubric = "The answer says 2." },\n', "")))
    with SQLiteLog(tmp_path / "log.db") as log:
        report, cases = run_ab(log, suite, lambda v: scripted_from_spec(v.agent["model"]), "two", "three",
                               run_id="ab")
        first = cases[0]
        assert (first.case_id, first.a.passed, first.b.passed, first.winner) == ("reaches-two", True, False, "two")
        forked = [e for e in log.read(first.b.session_id) if e.type == "SessionForked"]
        assert forked[0].payload.parent_session_id == first.a.session_id and forked[0].payload.parent_seq == 1
        assert first.diverged.startswith("A: seq 2 ModelRequested") and "adder:3" in first.diverged
        assert [v.passed for v in report.variants] == [1, 0]
        n = sum(i.next_seq for i in log.sessions())
        run_ab(log, suite, lambda v: scripted_from_spec(v.agent["model"]), "two", "three", run_id="ab")
        assert sum(i.next_seq for i in log.sessions()) == n  # the same run writes nothing twice
        with pytest.raises(ValueError, match="no variant 'four'"):
            run_ab(log, suite, lambda v: scripted_from_spec("adder:1"), "two", "four", run_id="ab")


def test_wilson_interval() -> None:
    assert wilson(0, 0) == (0.0, 1.0)
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson(10, 10)[1] == 1.0 and wilson(0, 10)[0] == 0.0


def test_the_eval_cli_prints_a_report_and_json(tmp_path: Path) -> None:
    path = write_suite(tmp_path, SUITE.replace('  { kind = "judge", rubric = "The answer says 2." },\n', ""))
    db = str(tmp_path / "log.db")
    out = cli("eval", str(path), "--provider", "scripted", "--db", db, "--run-id", "x")
    assert out.returncode == 0, out.stderr
    assert "two" in out.stdout and "2/4" in out.stdout and "95% CI" in out.stdout
    assert "reaches-two #1: PASS" in out.stderr
    js = cli("eval", str(path), "--provider", "scripted", "--db", db, "--run-id", "x", "--json")
    assert js.returncode == 0 and json.loads(js.stdout)["variants"][1]["passed"] == 0


@pytest.mark.parametrize("text, message", [
    ("name = 'x'\n", "no [[cases]]"),
    ("[[cases]]\nid = 'a'\ngoal = 'g'\ngraders = [{ kind = 'regexp', pattern = 'x' }]\n", "kind: one of"),
    ("[[cases]]\nid = 'a'\ngoal = 'g'\ngraders = [{ kind = 'regex', patern = 'x' }]\n", "unknown key cases[0].graders[0].patern"),
    ("[[cases]]\nid = 'a'\ngoal = 'g'\ngraders = [{ kind = 'regex', pattern = '(' }]\n", "not a regular expression"),
    ("trails = 3\n", "unknown key trails"),
    ("trials = 0\n[[cases]]\nid='a'\ngoal='g'\ngraders=[{kind='exact', value='1'}]\n", "trials: a whole number"),
    ("[[cases]]\nid = 'a'\ngoal = ' '\ngraders = [{ kind = 'exact', value = '1' }]\n", "needs an id and a goal"),
    ("[[cases]]\nid = 'a'\ngoal = 'g'\n", "at least one grader"),
    ("[[cases]]\nid = 'a'\ngoal = 'g'\ngraders = [{ kind = 'python', function = 'nofn' }]\n", "file.py:name"),
    ("[agent]\nsystem_promt = 'x'\n", "unknown key agent.system_promt"),
    ("this is = not toml", "not valid TOML"),
])
def test_a_bad_suite_is_one_line_naming_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SuiteError, match=None) as err:
        load_suite(path)
    assert message in str(err.value) and str(path) in str(err.value)
    if "patern" not in text:
        return  # one case through the CLI is enough (a subprocess costs seconds)
    out = cli("eval", str(path), "--provider", "scripted", "--db", str(tmp_path / "l.db"))
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_a_suite_that_is_not_utf8_or_missing_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bin.toml"
    path.write_bytes(b"name = '\xff'\n")
    with pytest.raises(SuiteError, match=r"suite .*bin.toml: not UTF-8 text \(line 1, byte 8"):
        load_suite(path)
    with pytest.raises(SuiteError, match="suite .*missing.toml: no such file"):
        load_suite(tmp_path / "missing.toml")


def test_a_broken_python_grader_fails_its_case_not_the_suite(tmp_path: Path) -> None:
    (tmp_path / "grade.py").write_text("def boom(answer, state):\n    raise RuntimeError('nope')\n")
    path = tmp_path / "s.toml"
    path.write_text("[[cases]]\nid='a'\ngoal='count'\ngraders=[{kind='python', function='grade.py:boom'},"
                    "{kind='python', function='grade.py:missing'}]\n")
    with SQLiteLog(tmp_path / "log.db") as log:
        report = run_suite(log, load_suite(path), lambda v: scripted_from_spec("adder:1"), run_id="r")
    (trial,) = report.variants[0].trials
    assert not trial.passed and "RuntimeError: nope" in trial.grades[0].detail and "missing" in trial.grades[1].detail


def test_the_example_suite_loads() -> None:
    suite = load_suite(ROOT / "examples" / "eval" / "arithmetic.toml")
    assert len(suite.cases) == 10 and [v.name for v in suite.variants] == ["use-tools", "terse"]


@pytest.mark.local
def test_the_example_suite_on_the_real_local_model(tmp_path: Path, local_server) -> None:
    """Two cases of the example suite on the real local model (the whole suite is a bench)."""
    suite = load_suite(ROOT / "examples" / "eval" / "arithmetic.toml")
    suite = type(suite)(suite.name, suite.path, 1, suite.cases[:2], suite.variants[:1])
    with SQLiteLog(tmp_path / "log.db") as log:
        report = run_suite(log, suite, lambda v: local_provider(local_server), run_id="local")
        trials = report.variants[0].trials
        assert len(trials) == 2 and all(t.status in ("done", "failed") for t in trials)
        assert all(t.grades for t in trials)  # graded, whatever the small model answered
