"""Memory across sessions (core/memory.py, tools/memory.py, runtime/memory.py) over a real
SQLite log with the scripted model: remember in one session, recall and injection in the
next, namespaces, forget, FTS search, redaction, replay, fork, redo, rebuild."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loopstream.cli.app import app
from loopstream.core import events as ev
from loopstream.core.memory import MemoryStore, fts_query, memory_id, recall_at_start
from loopstream.core.policy import Memory
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from loopstream.observe.feedback import give_feedback
from loopstream.providers.base import Message, ModelReply, ToolCall
from loopstream.providers.scripted import ScriptedProvider
from loopstream.replay.determinism import check_determinism
from loopstream.replay.fork import fork
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig
from loopstream.runtime.memory import MemoryCommandError, forget, learn

FACT = "The deploy script lives in ops/deploy.sh and needs --dry-run first"


@pytest.fixture(autouse=True)
def user(monkeypatch) -> None:
    monkeypatch.setenv("LOOPSTREAM_USER", "ada")


@pytest.fixture
def log(tmp_path):
    with SQLiteLog(tmp_path / "memory.db") as log:
        yield log


def config(tmp_path: Path, agent: str = "coder", **memory) -> SessionConfig:
    (tmp_path / "proj").mkdir(exist_ok=True)
    return SessionConfig(provider="scripted", model="scripted", tools=["add"], agent=agent, system_prompt="be brief",
                         workdir=str(tmp_path / "proj"), policy={"memory": {"enabled": True, **memory}})


def calls(*steps: tuple[str, dict] | str):
    """A model that makes each step in turn: (tool, arguments) or a final answer."""
    def script(messages: list[Message]) -> ModelReply:
        step = steps[min(sum(m.role == "assistant" for m in messages), len(steps) - 1)]
        if isinstance(step, str):
            return ModelReply(text=step, input_tokens=5, output_tokens=3)
        n = sum(m.role == "assistant" for m in messages)
        return ModelReply(text="", tool_calls=[ToolCall(call_id=f"c{n}", name=step[0], arguments=step[1])],
                          input_tokens=5, output_tokens=3)
    return script


def run(log, cfg: SessionConfig, goal: str, *steps) -> tuple[str, object, ScriptedProvider]:
    provider = ScriptedProvider(calls(*steps))
    rt = build_runtime(log, provider)
    sid = rt.start_session(goal, cfg)
    return sid, rt.run_session(sid), provider


def of(log, sid: str, kind: type[ev.Payload]) -> list[ev.Event]:
    return [e for e in log.read(sid) if isinstance(e.payload, kind)]


def remember_in_a(log, tmp_path, text: str = FACT, **memory) -> str:
    sid, state, _ = run(log, config(tmp_path, **memory), "set up the deploy", ("remember", {"text": text}), "ok")
    assert state.status == "done", state.error
    return sid


def test_remember_in_one_session_is_recalled_and_injected_in_the_next(log, tmp_path) -> None:
    a = remember_in_a(log, tmp_path)
    events = log.read(a)
    (kept,) = of(log, a, ev.MemoryRemembered)
    done = events[kept.seq + 1]
    assert done.type == "ToolCompleted" and done.causation_id == kept.causation_id  # one batch with its result
    assert kept.payload.namespace == "ada/coder/proj" and kept.payload.text == FACT
    assert fold(events).policy.memory.namespace == "ada/coder/proj"  # the namespace is recorded resolved
    assert {"remember", "recall"} <= set(events[0].payload.tools)

    b, state, provider = run(log, config(tmp_path), "how do I run the deploy script?",
                             ("recall", {"query": "deploy script"}), "use ops/deploy.sh")
    first = log.read(b)
    assert [e.type for e in first[:3]] == ["SessionStarted", "MemoryRecalled", "GoalReceived"]
    recalled = first[1].payload
    assert recalled.memory_ids == [kept.payload.memory_id] and FACT in recalled.text
    assert 0 < recalled.tokens <= recalled.budget_tokens
    # the model saw it, before the goal, as a system message
    assert state.messages[1].role == "system" and FACT in state.messages[1].content
    (result,) = [e.payload for e in log.read(b) if e.type == "ToolCompleted"]
    assert FACT in result.result


def test_namespaces_isolate(log, tmp_path, monkeypatch) -> None:
    remember_in_a(log, tmp_path)
    other, _, _ = run(log, config(tmp_path, agent="reviewer"), "the deploy script?",
                      ("recall", {"query": "deploy"}), "none")
    assert of(log, other, ev.MemoryRecalled)[0].payload.memory_ids == []
    assert [e.payload.result for e in of(log, other, ev.ToolCompleted)] == ["no memory matches"]
    monkeypatch.setenv("LOOPSTREAM_USER", "bob")
    bobs, _, _ = run(log, config(tmp_path), "the deploy script?", "none")
    assert of(log, bobs, ev.MemoryRecalled)[0].payload.memory_ids == []
    shared, _, _ = run(log, config(tmp_path, namespace="ada/coder/proj"), "the deploy script?", "yes")
    assert len(of(log, shared, ev.MemoryRecalled)[0].payload.memory_ids) == 1  # a namespace named outright


def test_forget_is_an_event_and_a_forks_copy_does_not_bring_it_back(log, tmp_path) -> None:
    a = remember_in_a(log, tmp_path)
    with MemoryStore(log.path) as store:
        mid = store.items()[0].memory_id
        item, written = forget(log, mid[:6], "ada", "moved to ci/")
        assert item.memory_id == mid and written.appended
        assert of(log, a, ev.MemoryForgotten)[0].payload.reason == "moved to ci/"
        assert store.items() == [] and store.get(mid).forgotten and store.search("deploy") == []
        # a fork of A copies its MemoryRemembered: the forgotten memory stays forgotten
        kept = of(log, a, ev.MemoryRemembered)[0]
        fork(log, a, kept.seq + 1, reason="again")
        assert store.items() == [] and store.count() == 0
        with pytest.raises(MemoryCommandError, match="already forgotten"):
            forget(log, mid, "ada")
        with pytest.raises(MemoryCommandError, match="no memory"):
            forget(log, "mzzz", "ada")
    b, _, _ = run(log, config(tmp_path), "the deploy script?", "none")
    assert of(log, b, ev.MemoryRecalled)[0].payload.memory_ids == []


def test_forget_waits_for_the_remembering_session_to_end(log, tmp_path) -> None:
    rt = build_runtime(log, ScriptedProvider(calls(("remember", {"text": FACT}), "ok")))
    sid = rt.start_session("keep it", config(tmp_path))
    state = rt.load(sid)
    for _ in range(4):  # ModelRequested, ModelResponded, ToolRequested, the remember batch
        (item,) = rt.dispatch.work(state)
        state = rt.act(state, item, ev.now_ms())[-1].state
    assert state.status == "planning"
    with MemoryStore(log.path) as store:
        mid = store.items()[0].memory_id
    with pytest.raises(MemoryCommandError, match=r"is planning: forget memory .* once it has ended"):
        forget(log, mid, "ada")


def test_full_text_search_ranks_and_survives_hostile_queries(log, tmp_path) -> None:
    for text in ("postgres runs on port 5433 in staging", "the staging box is staging-01",
                 "cats are not dogs"):
        remember_in_a(log, tmp_path, text)
    with MemoryStore(log.path) as store:
        found = [m.text for m in store.search("which port does postgres use in staging?")]
        assert found[0] == "postgres runs on port 5433 in staging" and "cats are not dogs" not in found
        for hostile in ('"', "NEAR(a b)", "*", "a OR", "\ud800", "x" * 100_000, "-- ; DROP TABLE events",
                        "staging*", "col:staging"):
            store.search(hostile)  # no FTS5 syntax error, whatever the text
        assert fts_query("the a of") is None and fts_query('deploy "x" OR y') == '"deploy"'


def test_a_secret_in_a_memory_is_redacted_in_the_log_and_the_store(log, tmp_path, monkeypatch) -> None:
    secret = "hunter2-very-secret-value"
    monkeypatch.setenv("DEPLOY_PASSWORD", secret)
    a = remember_in_a(log, tmp_path, f"the deploy password is {secret}")
    (kept,) = of(log, a, ev.MemoryRemembered)
    assert kept.payload.text == "the deploy password is [REDACTED:DEPLOY_PASSWORD]"
    with MemoryStore(log.path) as store:
        assert store.items()[0].text == kept.payload.text
    assert not [r for r, in sqlite3.connect(log.path).execute("SELECT data FROM events") if secret.encode() in r]
    assert secret not in json.dumps(MemoryStore(log.path).snapshot())


def test_hostile_and_oversized_texts_and_the_limits(log, tmp_path) -> None:
    hostile = "ends </system> here\x1b[31m \ud800 [[markup]]\nnext line"
    a = remember_in_a(log, tmp_path, hostile, max_chars=100, max_writes=2)
    (kept,) = of(log, a, ev.MemoryRemembered)
    assert "\ud800" not in kept.payload.text and "\x1b" not in kept.payload.text
    assert kept.payload.text.startswith("ends </system> here[31m \ufffd [[markup]]")
    sid, state, _ = run(log, config(tmp_path, max_chars=100, max_writes=2), "keep things",
                        ("remember", {"text": "y" * 101}), ("remember", {"text": "   "}),
                        ("remember", {"text": "one"}), ("remember", {"text": "one"}),
                        ("remember", {"text": "two"}), ("remember", {"text": "three"}), "done")
    failed = [(e.payload.error_kind, e.payload.message[:30]) for e in of(log, sid, ev.ToolFailed)]
    assert failed[0] == ("invalid_arguments", "too long to remember: 101 char")
    assert failed[1][0] == "invalid_arguments"
    assert failed[2] == ("memory_full", "this session may remember at m")
    results = [e.payload.result for e in of(log, sid, ev.ToolCompleted)]
    assert results[1].startswith("already remembered")  # the same text twice is one memory
    assert [e.payload.text for e in of(log, sid, ev.MemoryRemembered)] == ["one", "two"]
    # the injected block is one line per memory: a memory's newlines cannot fake a new section
    recalled = recall_at_start(MemoryStore(log.path), "next line here", fold(log.read(sid)).policy.memory)
    assert "ends </system> here[31m \ufffd [[markup]] next line" in recalled.text


def test_memory_off_means_no_event_no_tools_and_the_old_shape(log, tmp_path) -> None:
    cfg = config(tmp_path)
    cfg.policy = cfg.policy.updated({"memory": {"enabled": False}})
    sid, state, _ = run(log, cfg, "add", ("remember", {"text": "x"}), "ok")
    events = log.read(sid)
    assert [e.type for e in events[:2]] == ["SessionStarted", "GoalReceived"]
    assert "memory" not in json.loads(events[0].payload.config_json) and events[0].payload.tools == ["add"]
    assert of(log, sid, ev.ToolFailed)[0].payload.error_kind == "unknown_tool"


def test_the_budget_bounds_what_is_injected(log, tmp_path) -> None:
    for i in range(6):
        remember_in_a(log, tmp_path, f"deploy fact number {i} " + "word " * 30)
    with MemoryStore(log.path) as store:
        settings = Memory(enabled=True, namespace="ada/coder/proj", budget_tokens=120)
        small = recall_at_start(store, "deploy fact", settings)
        assert 1 <= len(small.memory_ids) < 6 and small.tokens <= 120
        assert recall_at_start(store, "deploy fact", settings.model_copy(update={"budget_tokens": 0})).text == ""
        assert len(recall_at_start(store, "deploy fact", settings.model_copy(
            update={"budget_tokens": 8000, "max_recalled": 3})).memory_ids) == 3


def test_replay_check_and_fork_see_the_recorded_memories_without_the_store(log, tmp_path) -> None:
    a = remember_in_a(log, tmp_path)
    b, _, _ = run(log, config(tmp_path), "the deploy script?", ("recall", {"query": "deploy"}), "ops/deploy.sh")
    with MemoryStore(log.path) as store:
        before = store.snapshot()
        # later memories change what a new start would recall, never what B recorded
        remember_in_a(log, tmp_path, "the deploy script was rewritten in go")
        after = store.snapshot()
        for sid in (a, b):  # the session that remembered, the one that was given it
            report = check_determinism(SQLiteLog(log.path, readonly=True), sid)
            assert report.ok and report.decisions_checked >= 3, report.render()
        assert store.snapshot() == after != before
        recalled = of(log, b, ev.MemoryRecalled)[0].payload
        # a fork after the start carries the same MemoryRecalled; it runs on with the same context
        goal_seq = of(log, b, ev.GoalReceived)[0].seq
        result = fork(log, b, goal_seq, reason="again")
        child = log.read(result.child_session_id)
        assert [e.payload for e in child if e.type == "MemoryRecalled"] == [recalled]
        seen = []
        provider = ScriptedProvider(lambda m: seen.append(m) or ModelReply(text="ok", input_tokens=1, output_tokens=1))
        build_runtime(log, provider).run_session(result.child_session_id)
        assert FACT in seen[0][1].content and "rewritten in go" not in seen[0][1].content
        assert store.snapshot() == after
        assert check_determinism(log, result.child_session_id).ok


def test_a_redo_of_the_remember_call_writes_nothing_twice(log, tmp_path) -> None:
    rt = build_runtime(log, ScriptedProvider(calls(("remember", {"text": FACT}), "ok")))
    sid = rt.start_session("keep it", config(tmp_path))
    state = rt.load(sid)
    for _ in range(3):
        (item,) = rt.dispatch.work(state)
        state = rt.act(state, item, ev.now_ms())[-1].state
    (item,) = rt.dispatch.work(state)
    assert item.actor == "tools"
    # the tool runs twice before anything is appended (a crash after it ran, a redelivery): the
    # same memory, the same keys, so the same event ids
    tools = next(p for p in rt.processors if p.name == "tools")
    cause = log.read(sid)[item.seq]
    a, b = tools.handle(cause, state, 1), tools.handle(cause, state, 2)
    assert [e.payload.TYPE for e in a] == ["MemoryRemembered", "ToolCompleted"]
    assert a[0].payload == b[0].payload and [e.key for e in a] == [e.key for e in b]
    first = rt.act(state, item, ev.now_ms())  # the tool ran and its batch was appended ...
    again = rt.act(state, item, ev.now_ms())  # ... and a process that had not seen it runs it again
    assert first[-1].appended and not again[-1].appended
    assert len(of(log, sid, ev.MemoryRemembered)) == 1
    with MemoryStore(log.path) as store:
        assert store.count() == 1
    assert rt.run_session(sid).status == "done"


def test_the_store_rebuilt_from_the_log_equals_the_live_one(log, tmp_path) -> None:
    for text in ("alpha beta", "gamma delta", "epsilon"):
        remember_in_a(log, tmp_path, text)
    with MemoryStore(log.path) as store:
        forget(log, store.search("gamma")[0].memory_id, "ada")
        learn(log, store.items()[0].session_id, "ada", text="check the staging box first")
        live = store.snapshot()
        assert store.rebuild() == 5 and store.snapshot() == live
    # a read-only store over a file whose tables are behind projects into TEMP tables, not the file
    remember_in_a(log, tmp_path, "zeta")
    os.chmod(log.path, 0o444)
    try:
        with MemoryStore(log.path, readonly=True) as ro:
            assert {m.text for m in ro.items()} == {"alpha beta", "epsilon", "zeta", "check the staging box first"}
    finally:
        os.chmod(log.path, 0o644)
    file = sqlite3.connect(log.path)
    behind = file.execute("SELECT gpos FROM memory_position").fetchone()[0]
    assert behind < file.execute("SELECT max(gpos) FROM events").fetchone()[0]  # the read-only store wrote nothing
    with MemoryStore(log.path) as store:
        assert store.count() == 4
        assert store._position() == store._head()


def test_lessons_from_feedback_reach_later_sessions_whatever_their_goal(log, tmp_path) -> None:
    a, _, _ = run(log, config(tmp_path), "add 2 and 2", "5")
    give_feedback(log, a, "ada", 0.0, "Use the add tool instead of guessing sums.")
    learned = learn(log, a, "ada")
    assert [m.kind for m in learned.lessons] == ["lesson"] and learned.namespace == "ada/coder/proj"
    assert learn(log, a, "ada").lessons == []  # learnt once
    b, state, _ = run(log, config(tmp_path), "what is 7 times 3?", "21")
    recalled = of(log, b, ev.MemoryRecalled)[0].payload
    assert "[lesson] Use the add tool instead of guessing sums." in recalled.text
    c, _, _ = run(log, config(tmp_path, lessons=False), "what is 7 times 3?", "21")
    assert of(log, c, ev.MemoryRecalled)[0].payload.memory_ids == []
    with pytest.raises(MemoryCommandError, match="no lesson"):
        learn(log, c, "ada")


def test_memory_ids_are_derived() -> None:
    assert memory_id("n", "s", "t") == memory_id("n", "s", "t") != memory_id("n", "s2", "t")


runner = CliRunner()


def cli(*args: str):
    """The memory commands in-process (a subprocess costs seconds each); stderr kept apart."""
    result = runner.invoke(app, ["memory", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
    return result


def test_the_memory_cli(log, tmp_path) -> None:
    remember_in_a(log, tmp_path)
    db = str(log.path)
    listed = cli("list", "--db", db, "--json")
    assert listed.exit_code == 0, listed.stderr
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["text"] == FACT and row["namespace"] == "ada/coder/proj"
    found = cli("search", "deploy dry-run", "--db", db)
    assert found.exit_code == 0 and row["id"] in found.stdout
    assert FACT in cli("show", row["id"][:5], "--db", db).stdout
    for args, message in ((("search", "  ", "--db", db), "the search query is empty"),
                          (("forget", "mzzz", "--db", db), "no memory 'mzzz'"),
                          (("list", "--kind", "facts", "--db", db), "--kind must be one of fact, lesson"),
                          (("list", "--db", str(tmp_path / "none.db")), "no log at"),
                          (("learn", row["session"], "--db", db), "has no lesson to learn")):
        bad = cli(*args)
        assert bad.exit_code == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    gone = cli("forget", row["id"][:5], "--db", db, "--reason", "stale")
    assert gone.exit_code == 0 and "forgot memory" in gone.stdout
    assert cli("list", "--db", db).stderr.strip() == "no memories"
    learned = cli("learn", row["session"], "--text", "Run with --dry-run first.", "--db", db)
    assert learned.exit_code == 0 and "lesson m" in learned.stdout
    assert "1 live memories" in cli("rebuild", "--db", db).stdout
    assert "--namespace" in cli("list", "--help").stdout


def test_memory_list_runs_as_a_process_on_a_read_only_log(log, tmp_path) -> None:
    remember_in_a(log, tmp_path)
    os.chmod(log.path, 0o444)
    try:
        done = subprocess.run([sys.executable, "-m", "loopstream.cli.app", "memory", "list", "--db", str(log.path)],
                              capture_output=True, text=True, timeout=60)
    finally:
        os.chmod(log.path, 0o644)
    assert done.returncode == 0 and FACT in done.stdout, done.stderr
