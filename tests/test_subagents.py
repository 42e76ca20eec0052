"""Sub-agents as child sessions (docs/subagents.md), on a real SQLite log with the scripted
model: a parent fans out to children that each use a tool; crashes at every event boundary
of the tree; cancel; limits; hostile task text; fork before and after a delegation."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from loopstream.core.policy import PolicyError, load_policy
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from loopstream.providers.base import Message, ModelReply, ProviderError, ToolCall
from loopstream.providers.scripted import ScriptedProvider, fanout_script
from loopstream.replay.commands import check_command
from loopstream.replay.determinism import check_determinism
from loopstream.replay.fork import ForkError, fork
from loopstream.replay.tree import descendants, tree_lines
from loopstream.runtime import decisions
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig

TOOLS = ["add", "spawn_agents", "delegate"]


@pytest.fixture
def log(tmp_path: Path):
    with SQLiteLog(tmp_path / "tree.db") as log:
        yield log


def config(**policy) -> SessionConfig:
    return SessionConfig(provider="scripted", model="fanout", tools=TOOLS, policy=policy)


def run_tree(log, script=None, goal="sum three sums", on_event=None, **policy):
    rt = build_runtime(log, ScriptedProvider(script or fanout_script(3)), on_event=on_event)
    sid = rt.start_session(goal, config(**policy))
    return rt, sid, rt.run_session(sid)


def goal_of(messages: list[Message]) -> str:
    return next(m.content for m in messages if m.role == "user")


def kids(log, sid) -> list[str]:
    """The children of `sid` as the log links them (SessionStarted v4), whatever ChildrenStarted says."""
    out = []
    for info in log.sessions():
        first = log.read(info.session_id, 0, 0)
        if first and first[0].payload.parent_session_id == sid:
            out.append(info.session_id)
    return sorted(out)


def test_a_parent_delegates_to_three_parallel_children_each_using_a_tool(log) -> None:
    _, sid, state = run_tree(log)
    assert state.status == "done" and state.answer == "total 15"  # (1+2) + (2+3) + (3+4)
    events = log.read(sid)
    started = next(e for e in events if e.type == "ChildrenStarted")
    settled = [e.payload for e in events if e.type == "ChildSettled"]
    assert [s.index for s in settled] == [0, 1, 2] and {s.status for s in settled} == {"done"}
    result = json.loads(next(e for e in events if e.type == "ToolCompleted").payload.result)
    assert [r["answer"] for r in result["results"]] == ["3", "5", "7"] and result["met"]
    assert all(r["tokens"] == 30 and r["status"] == "done" for r in result["results"])
    children = [c.session_id for c in started.payload.children]
    assert kids(log, sid) == sorted(children)
    for i, child in enumerate(children):
        first, *rest = log.read(child)
        assert (first.payload.parent_session_id, first.payload.parent_event_id, first.payload.depth) == \
            (sid, started.event_id, 1)
        assert "ToolCompleted" in [e.type for e in rest]  # each child used the add tool
        assert fold([first, *rest]).answer == str(3 + 2 * i)
    # the children's tokens count toward the parent's
    own = sum(e.payload.input_tokens + e.payload.output_tokens for e in events if e.type == "ModelResponded")
    assert state.input_tokens + state.output_tokens == own + 3 * 30
    # replay --check of the parent and its children
    assert check_determinism(log, sid).ok
    assert all(check_determinism(log, c).ok for c in children)
    checked = check_command(log, sid)
    assert checked.exit_code == 0 and checked.text.count("no divergence") == 4
    assert len(tree_lines(log, sid)) == 3


def test_children_run_in_parallel_on_a_bounded_pool(log) -> None:
    inner, lock, running, peak = fanout_script(4), threading.Lock(), [0], [0]

    def script(messages: list[Message]) -> ModelReply:
        if goal_of(messages).startswith("add ") and not any(m.role == "tool" for m in messages):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.15)
            with lock:
                running[0] -= 1
        return inner(messages)

    _, _, state = run_tree(log, script, delegation={"max_parallel": 2})
    assert state.answer == "total 24" and peak[0] == 2


def test_modes_first_and_quorum_and_a_failed_child_is_a_result(log) -> None:
    inner = fanout_script(3)

    def failing(mode):
        def script(messages):
            goal = goal_of(messages)
            if goal == "add 1 2":
                raise ProviderError("child model down", retryable=False, kind="bad_request")
            if goal.startswith("add ") or any(m.role == "tool" for m in messages):
                return inner(messages)
            tasks = [{"task": f"add {i} {i + 1}"} for i in range(1, 4)]
            return ModelReply(tool_calls=[ToolCall(call_id="d0", name="spawn_agents",
                                                   arguments={"tasks": tasks, "mode": mode})])
        return script

    _, sid, state = run_tree(log, failing("all"))
    assert state.answer == "total 12"  # the failed child counts 0
    rows = json.loads(next(e for e in log.read(sid) if e.type == "ToolCompleted").payload.result)["results"]
    assert [r["status"] for r in rows] == ["failed", "done", "done"] and "child model down" in rows[0]["error"]
    # first: one child at a time; the first success decides, the third is never started
    _, sid, state = run_tree(log, failing("first"), delegation={"max_parallel": 1})
    rows = json.loads(next(e for e in log.read(sid) if e.type == "ToolCompleted").payload.result)["results"]
    assert [r["status"] for r in rows] == ["failed", "done", "cancelled"] and state.answer == "total 5"
    assert len(kids(log, sid)) == 2
    # quorum 2 of 3 (the default majority), one at a time: all three are needed
    _, sid, state = run_tree(log, failing("quorum"), delegation={"max_parallel": 1})
    assert state.answer == "total 12"


def test_a_delegate_call_returns_the_childs_answer(log) -> None:
    def script(messages):
        goal = goal_of(messages)
        results = [m.content for m in messages if m.role == "tool"]
        if goal.startswith("add "):
            return fanout_script(1)(messages)
        if not results:
            return ModelReply(tool_calls=[ToolCall(call_id="x", name="delegate", arguments={"task": "add 20 22"})])
        return ModelReply(text=f"the child said {results[-1]}")

    _, sid, state = run_tree(log, script)
    assert state.answer == "the child said 42"


def test_limits_refuse_the_call_and_the_model_reads_why(log) -> None:
    for policy, words in (({"delegation": {"max_depth": 0}}, "depth limit"),
                          ({"delegation": {"max_children": 2}}, "fan-out limit"),
                          ({"delegation": {"max_task_chars": 5}}, "max_task_chars")):
        _, sid, state = run_tree(log, **policy)
        failed = next(e.payload for e in log.read(sid) if e.type == "ToolFailed")
        assert failed.error_kind == "delegation_refused" and words in failed.message
        assert kids(log, sid) == [] and state.status == "done"  # the model answered after reading it
    # recorded whole in SessionStarted, so a replay decides the same
    recorded = json.loads(log.read(sid, 0, 0)[0].payload.config_json)["delegation"]
    assert recorded["max_task_chars"] == 5 and recorded["max_depth"] == 2


def test_depth_limit_holds_down_a_tree(log) -> None:
    """Every session delegates: with max_depth 2 the grandchildren are refused."""
    def script(messages):
        if any(m.role == "tool" for m in messages):
            return ModelReply(text=f"depth answer: {messages[-1].content[:60]}")
        return ModelReply(tool_calls=[ToolCall(call_id="d", name="delegate", arguments={"task": "go deeper"})])

    _, sid, state = run_tree(log, script, delegation={"max_depth": 2})
    tree = list(descendants(log, sid))
    assert [d for d, _ in tree] == [1, 2] and state.status == "done"
    grandchild = tree[1][1].session_id
    refused = next(e.payload for e in log.read(grandchild) if e.type == "ToolFailed")
    assert refused.error_kind == "delegation_refused" and "depth 2" in refused.message


def test_a_misspelt_delegation_key_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[delegation]\nmax_childs = 3\n")
    with pytest.raises(PolicyError, match=r"delegation.max_childs: unknown key; did you mean 'max_children'"):
        load_policy(path)


def test_hostile_task_text(log) -> None:
    nasty = "add 1 2 \ud800 <script>alert(1)</script> \x1b[31m" + "é" * 50

    def script(messages):
        goal = goal_of(messages)
        if goal.startswith("add "):
            return fanout_script(1)(messages)
        if not any(m.role == "tool" for m in messages):
            return ModelReply(tool_calls=[ToolCall(call_id="h", name="spawn_agents", arguments={
                "tasks": [{"task": nasty}, {"task": "x", "agent": "../../etc\ud800"}]})])
        return ModelReply(text="ok")

    _, sid, state = run_tree(log, script)
    refused = next(e.payload for e in log.read(sid) if e.type == "ToolFailed")
    assert "not one this session may start" in refused.message  # the unknown agent refuses the whole call
    script_ok = lambda m: script(m) if goal_of(m).startswith("add ") or any(x.role == "tool" for x in m) \
        else ModelReply(tool_calls=[ToolCall(call_id="h", name="delegate", arguments={"task": nasty})])  # noqa: E731
    _, sid, state = run_tree(log, script_ok)
    (child,) = kids(log, sid)
    goal = log.read(child)[1].payload.text
    assert "\ud800" not in goal and "\ufffd" in goal and "<script>" in goal  # stored as text, sanitized
    assert fold(log.read(child)).answer == "3" and state.status == "done"
    assert tree_lines(log, sid)[0].count("\n") == 0


class Died(BaseException):
    """The process 'dies': every append after the N-th raises (the crash tests' boundary)."""


def test_death_at_every_event_boundary_of_the_tree_then_resume(tmp_path: Path) -> None:
    with SQLiteLog(tmp_path / "ref.db") as ref_log:
        _, ref_sid, ref_state = run_tree(ref_log)
        total = sum(len(ref_log.read(s.session_id)) for s in ref_log.sessions())
        reference = sorted(tuple(e.type for e in ref_log.read(s.session_id)) for s in ref_log.sessions())
    with SQLiteLog(tmp_path / "crash.db") as log:
        for n in range(1, total):
            appended = [0]

            def on_event(_e, appended=appended, n=n):
                appended[0] += 1
                if appended[0] >= n:
                    raise Died(n)

            rt = build_runtime(log, ScriptedProvider(fanout_script(3)), on_event=on_event)
            sid = rt.start_session("sum three sums", config(), session_id=f"p{n:03d}") if n > 2 else f"p{n:03d}"
            if n <= 2:  # the start batch is two events: die inside it
                try:
                    rt.start_session("sum three sums", config(), session_id=sid)
                except Died:
                    pass
            else:
                with pytest.raises(Died):
                    rt.run_session(sid)
            _settle_threads()
            state = build_runtime(log, ScriptedProvider(fanout_script(3))).run_session(sid)
            assert state.status == "done" and state.answer == ref_state.answer, n
            tree = [sid, *kids(log, sid)]
            assert len(tree) == 4, (n, tree)
            got = sorted(tuple(e.type for e in log.read(s)) for s in tree)
            assert got == reference, f"died after {n} appends"
            for s in tree:
                events = log.read(s)
                assert len({e.event_id for e in events}) == len(events)


def _settle_threads(timeout: float = 5.0) -> None:
    """Wait for the dead runtime's child threads to stop (a real crash takes them with it)."""
    end = time.monotonic() + timeout
    while any(t.name.startswith("loopstream-child") for t in threading.enumerate()) and time.monotonic() < end:
        time.sleep(0.01)


def test_cancelling_the_parent_cancels_its_running_children(log) -> None:
    inner = fanout_script(3)

    def slow(messages):
        if goal_of(messages).startswith("add "):
            from loopstream.core import cancel
            cancel.sleep(30)
        return inner(messages)

    rt = build_runtime(log, ScriptedProvider(slow))
    sid = rt.start_session("sum", config())
    box = {}
    runner = threading.Thread(target=lambda: box.setdefault("state", rt.run_session(sid)))
    began = time.monotonic()
    runner.start()
    while len(kids(log, sid)) < 3 or any(fold(log.read(c)).status != "awaiting_model" for c in kids(log, sid)):
        assert time.monotonic() - began < 10
        time.sleep(0.02)
    decisions.cancel(log, sid, by="person:test", reason="enough")
    runner.join(10)
    assert not runner.is_alive() and time.monotonic() - began < 8
    assert box["state"].status == "cancelled"
    assert {fold(log.read(c)).status for c in kids(log, sid)} == {"cancelled"}


def test_cancel_reaches_children_when_no_process_drives_the_parent(log) -> None:
    """A parent whose process died mid-delegation, its children started: `cancel` still ends them."""
    from loopstream.processors.delegation import Delegation
    from loopstream.runtime.assembly import processors_for
    from loopstream.runtime.children import ChildRunner
    from loopstream.runtime.inline import Runtime, RuntimeStuck

    rt = Runtime(log, [Delegation(), *processors_for("all", provider=ScriptedProvider(fanout_script(2)))])
    sid = rt.start_session("sum", config())
    with pytest.raises(RuntimeStuck):  # no child runner here: the parent stops at its delegation
        rt.run_session(sid)
    parent = fold(log.read(sid))
    (d,) = parent.delegations.values()
    for child in d.children:  # what the dead runner had done: the children started, not run
        rt.writer.start(child.task, ChildRunner().config_for(child.agent, parent, d, 0), session_id=child.session_id)
    children = kids(log, sid)
    assert parent.status == "awaiting_children" and len(children) == 2
    decisions.cancel(log, sid, by="person:test")
    assert {fold(log.read(c)).status for c in children} == {"cancelled"}


def test_approval_in_a_child_reaches_the_person_and_show_says_so(log) -> None:
    rt = build_runtime(log, ScriptedProvider(fanout_script(1)))
    policy = {"permissions": {"rules": [{"tool": "add", "action": "ask", "reason": "check sums"}]}}
    sid = rt.start_session("sum", config(**policy))
    box = {}
    runner = threading.Thread(target=lambda: box.setdefault("state", rt.run_session(sid)))
    runner.start()
    began = time.monotonic()
    while not kids(log, sid) or not fold(log.read(kids(log, sid)[0])).open_approvals:
        assert time.monotonic() - began < 10
        time.sleep(0.02)
    (child,) = kids(log, sid)
    assert "waits for a person: loopstream approve " + child in tree_lines(log, sid)[0]
    call = decisions.waiting_call(fold(log.read(child)), None)
    decisions.decide(log, child, call.call_id, True, by="person:test")
    runner.join(10)
    assert box["state"].status == "done" and box["state"].answer == "total 3"


def test_fork_before_a_delegation_reruns_children_after_it_reuses_them(log) -> None:
    _, sid, state = run_tree(log)
    events = log.read(sid)
    started = next(e for e in events if e.type == "ChildrenStarted")
    original = sorted(c.session_id for c in started.payload.children)
    forked_at = []
    for at in range(1, len(events) - 1):
        before = len(log.sessions())
        try:
            result = fork(log, sid, at, reason=f"at {at}")
        except ForkError:
            continue
        rt = build_runtime(log, ScriptedProvider(fanout_script(3)))
        forked = rt.run_session(result.child_session_id)
        assert forked.status == "done" and forked.answer == state.answer, at
        named = sorted(c.session_id for e in log.read(result.child_session_id) if e.type == "ChildrenStarted"
                       for c in e.payload.children)
        new_sessions = len(log.sessions()) - before - 1
        if at < started.seq:
            assert set(named).isdisjoint(original) and new_sessions == 3, at  # fresh children
        else:
            assert named == original and new_sessions == 0, at  # the recorded results reused
        assert check_determinism(log, result.child_session_id).ok
        forked_at.append(at)
    # every event but the start, the end and the inside of the ChildSettled batch (never a live state)
    inside = [e.seq for e in events if e.type == "ChildSettled"]
    assert forked_at == [s for s in range(1, len(events) - 1) if s not in inside]
    assert min(forked_at) < started.seq <= max(forked_at)


def test_fan_out_maps_goals_over_an_agent_and_a_rerun_continues(log) -> None:
    from loopstream import Result, fan_out

    rt = build_runtime(log, ScriptedProvider(fanout_script()))
    cfg = SessionConfig(provider="scripted", model="fanout", tools=["add"])
    goals = [f"add {i} {i}" for i in range(6)] + ["add x y"]
    results = fan_out(rt, goals, cfg, max_parallel=3, key="batch-1")
    assert all(isinstance(r, Result) for r in results)
    assert [r.answer for r in results[:6]] == [str(2 * i) for i in range(6)]
    assert [r.index for r in results] == list(range(7)) and results[0].input_tokens == 22
    assert not results[6].ok  # a goal whose session fails is a result, not an exception
    again = fan_out(rt, goals, cfg, max_parallel=3, key="batch-1")
    assert [r.session_id for r in again] == [r.session_id for r in results] and len(log.sessions()) == 7


def test_childrens_tokens_count_toward_the_parents_budget(log) -> None:
    _, sid, state = run_tree(log, budgets={"max_tokens": 100})
    assert state.status == "failed" and "token budget" in state.error  # 30 own + 3 x 30 children > 100
    started = next(e for e in log.read(sid) if e.type == "ChildrenStarted")
    for child in started.payload.children:  # each child started with what the parent had left
        recorded = json.loads(log.read(child.session_id, 0, 0)[0].payload.config_json)
        assert recorded["budgets"]["max_tokens"] == 70


def test_a_worker_without_a_child_runner_fails_the_call_saying_so(log) -> None:
    from loopstream.runtime.assembly import processors_for
    from loopstream.runtime.inline import Runtime

    rt = Runtime(log, processors_for("all", provider=ScriptedProvider(fanout_script(2))))
    sid = rt.start_session("sum", config())
    state = rt.run_session(sid)
    failed = next(e.payload for e in log.read(sid) if e.type == "ToolFailed")
    assert failed.error_kind == "delegation_unavailable" and state.status == "done"


def test_spawn_over_decomposes_a_long_file_recursively(log, tmp_path: Path) -> None:
    """Recursive decomposition: 60 lines, slices of ~190 characters, at most 3 children per call:
    the parent splits the file into 2 ranges, each child calls spawn_over on its range, and the
    grandchildren each count the marked lines of one slice; every slice is a child's goal."""
    import re

    (tmp_path / "long.txt").write_text("".join(f"line {i:03d} {'x' if i % 3 == 0 else 'o'}\n" for i in range(1, 61)))

    def script(messages):
        goal = goal_of(messages)
        results = [m.content for m in messages if m.role == "tool"]
        if results:  # combine: the sum of the children's counts
            rows = json.loads(results[-1])["results"]
            return ModelReply(text=str(sum(int(r["answer"]) for r in rows if r["status"] == "done")))
        if (m := re.search(r"start_line=(\d+), end_line=(\d+)", goal)) is not None:
            return ModelReply(tool_calls=[ToolCall(call_id="o", name="spawn_over", arguments={
                "path": "long.txt", "instruction": "count x", "slice_chars": 400,
                "start_line": int(m[1]), "end_line": int(m[2])})])
        if goal.startswith("count x"):  # a slice: count it
            return ModelReply(text=str(sum(1 for line in goal.splitlines()[3:] if line.endswith(" x"))))
        return ModelReply(tool_calls=[ToolCall(call_id="o", name="spawn_over", arguments={
            "path": "long.txt", "instruction": "count x", "slice_chars": 400})])

    rt = build_runtime(log, ScriptedProvider(script))
    cfg = SessionConfig(provider="scripted", model="s", tools=["spawn_over"], workdir=str(tmp_path),
                        policy={"delegation": {"max_children": 3, "max_depth": 3}})
    sid = rt.start_session("how many lines are marked x?", cfg)
    state = rt.run_session(sid)
    assert state.status == "done" and state.answer == "20"
    tree = list(descendants(log, sid))
    assert [d for d, _ in tree].count(1) == 2 and [d for d, _ in tree].count(2) == 4
    slices = [fold(log.read(c.session_id)).goal for d, c in tree if d == 2]
    assert "".join(s.split("\n", 3)[3] for s in slices) == (tmp_path / "long.txt").read_text()  # every line once
    assert check_command(log, sid).exit_code == 0
    # a file outside the workdir is refused, as by the file tools
    cfg.workdir = str(tmp_path / "sub")
    (tmp_path / "sub").mkdir()
    sid = rt.start_session("how many lines are marked x?", dataclasses_replace(cfg, tools=["spawn_over"]))
    script_out = ScriptedProvider(lambda m: ModelReply(text="refused") if any(x.role == "tool" for x in m) else
                                  ModelReply(tool_calls=[ToolCall(call_id="o", name="spawn_over", arguments={
                                      "path": "../long.txt", "instruction": "count x"})]))
    build_runtime(log, script_out).run_session(sid)
    refused = next(e.payload for e in log.read(sid) if e.type == "ToolFailed")
    assert refused.error_kind == "delegation_refused" and "cannot read" in refused.message


def dataclasses_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_named_agents_a_child_may_run_as(log) -> None:
    def script(messages):
        goal = goal_of(messages)
        if goal.startswith("add "):
            return fanout_script(1)(messages)
        if not any(m.role == "tool" for m in messages):
            return ModelReply(tool_calls=[ToolCall(call_id="n", name="spawn_agents", arguments={"tasks": [
                {"task": "add 1 1", "agent": "checker"}, {"task": "add 2 2", "agent": "ghost"}]})])
        return ModelReply(text=messages[-1].content)

    checker = SessionConfig(provider="scripted", model="s", tools=["add"], system_prompt="You check sums.",
                            agent="checker")
    rt = build_runtime(log, ScriptedProvider(script), agents={"checker": checker})
    sid = rt.start_session("sum", config(delegation={"agents": ["checker", "ghost"]}))
    state = rt.run_session(sid)
    rows = json.loads(state.answer)["results"]
    assert [r["status"] for r in rows] == ["done", "failed"] and "unknown agent 'ghost'" in rows[1]["error"]
    first = log.read(rows[0]["session"], 0, 0)[0].payload
    assert (first.agent, first.system_prompt, first.tools, first.depth) == ("checker", "You check sums.", ["add"], 1)
    # an agent the parent's recorded definition does not allow is refused before anything starts
    sid = rt.start_session("sum", config())
    rt.run_session(sid)
    refused = next(e.payload for e in log.read(sid) if e.type == "ToolFailed")
    assert "'checker' is not one this session may start" in refused.message


def test_sessions_shows_a_running_child_as_running_not_interrupted(log) -> None:
    from loopstream.replay.inspect import session_rows

    inner, seen = fanout_script(1), {}

    def script(messages):
        if goal_of(messages).startswith("add ") and not seen:
            seen["rows"] = {r.session_id: (r.status, r.parent) for r in session_rows(log)}
        return inner(messages)

    _, sid, state = run_tree(log, script)
    (child,) = kids(log, sid)
    assert seen["rows"][child] == ("running", sid) and state.status == "done"


def test_workers_run_a_tree_across_roles_and_a_redelivery_writes_nothing_twice(log) -> None:
    """The subscription driver (here over SQLite's subscribe; Kafka's is the same code): the
    children are ordinary sessions the workers take; a watcher reports each child's end to its
    parent. Separate role workers, then new groups reading everything again."""
    from loopstream.runtime.assembly import processors_for
    from loopstream.runtime.worker import Worker
    from loopstream.runtime.writer import SessionWriter
    from tests.test_worker import run_workers

    provider = ScriptedProvider(fanout_script(3))
    sid = SessionWriter(log).start("sum", config())

    def workers(prefix):
        return [Worker(log, processors_for(r, provider=provider, subagents=log), f"{prefix}.{r}")
                for r in ("orchestrator", "model", "tool")]

    run_workers(workers("w"), lambda: fold(log.read(sid)).terminal)
    state = fold(log.read(sid))
    assert state.status == "done" and state.answer == "total 15"
    tree = [sid, *kids(log, sid)]
    before = {s: len(log.read(s)) for s in tree}
    assert len(tree) == 4 and sorted(e.payload.index for e in log.read(sid) if e.type == "ChildSettled") == [0, 1, 2]
    rows = json.loads(next(e for e in log.read(sid) if e.type == "ToolCompleted").payload.result)["results"]
    assert [r["index"] for r in rows] == [0, 1, 2]  # reported as they end, aggregated in the order asked
    total = sum(before.values())
    again = workers("w2")
    run_workers(again, lambda: all(w.stats.snapshot().get("delivered", 0) >= total for w in again))
    assert {s: len(log.read(s)) for s in tree} == before
    assert check_command(log, sid).exit_code == 0


@pytest.mark.kafka
def test_kafka_workers_run_a_tree(kafka_broker: str, tmp_path: Path) -> None:
    """The same tree over a real Kafka-protocol broker (Tansu): three role workers, each with its
    own KafkaLog; the children are sessions on the events topic like any other."""
    import uuid

    from loopstream.kafka.log import KafkaLog
    from loopstream.runtime.assembly import processors_for
    from loopstream.runtime.worker import Worker
    from loopstream.runtime.writer import SessionWriter
    from tests.test_worker import run_workers

    prefix = "sa" + uuid.uuid4().hex[:8]
    fast = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500, "fetch.wait.max.ms": 20}
    logs = {r: KafkaLog(kafka_broker, topic=f"{prefix}.events", projection_path=tmp_path / f"{r}.db",
                        consumer_config=fast) for r in ("orchestrator", "model", "tool", "reader")}
    try:
        provider = ScriptedProvider(fanout_script(3))
        reader = logs["reader"]
        sid = SessionWriter(reader).start("sum", config())
        workers = [Worker(logs[r], processors_for(r, provider=provider, subagents=logs[r]), f"{prefix}.{r}")
                   for r in ("orchestrator", "model", "tool")]
        run_workers(workers, lambda: fold(reader.read(sid)).terminal, timeout=90)
        state = fold(reader.read(sid))
        assert state.status == "done" and state.answer == "total 15"
        children = [c.session_id for e in reader.read(sid) if e.type == "ChildrenStarted" for c in e.payload.children]
        for child in children:
            events = reader.read(child)
            assert events[0].payload.parent_session_id == sid and fold(events).status == "done"
            assert len({e.event_id for e in events}) == len(events)
    finally:
        for log in logs.values():
            log.close()


@pytest.mark.slow
def test_a_worker_process_killed_mid_tree_is_replaced_and_the_tree_ends_once(tmp_path: Path) -> None:
    """`loopstream worker` processes (one per role) over a SQLite bus; the orchestrator worker,
    which starts and reports the children, is SIGKILLed as soon as the delegation is in the log,
    and a new one takes over from the group's committed position."""
    import signal

    from loopstream.runtime.writer import SessionWriter
    from tests.test_kafka_workers import Workers

    db = tmp_path / "w.db"
    with SQLiteLog(db) as log:
        sid = SessionWriter(log).start("sum", config())
    workers = Workers(f"sqlite://{db}", tmp_path)
    try:
        for role in ("model", "tool", "orchestrator"):
            workers.start(role, model="fanout:3")
        began = time.monotonic()
        with SQLiteLog(db, readonly=True) as log:
            while not any(e.type == "ChildrenStarted" for e in log.read(sid)):
                assert time.monotonic() - began < 60, workers.logs()
                time.sleep(0.02)
        victim = workers.procs.pop("orchestrator")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        workers.start("orchestrator", model="fanout:3")
        with SQLiteLog(db, readonly=True) as log:
            while not fold(log.read(sid)).terminal:
                assert time.monotonic() - began < 90, workers.logs()
                time.sleep(0.05)
            state = fold(log.read(sid))
            assert state.status == "done" and state.answer == "total 15", workers.logs()
            assert len(kids(log, sid)) == 3
            for s in [sid, *kids(log, sid)]:
                events = log.read(s)
                assert len({e.event_id for e in events}) == len(events) and fold(events).status == "done"
    finally:
        workers.stop_all()
