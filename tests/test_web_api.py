"""The inspector's HTTP API over real HTTP (a uvicorn server in a thread) against a real
SQLite log, with the scripted model: start, list, read, stream, approve/deny, cancel, fork,
tree, diff, feedback, evals; and what it refuses (no token, another host, another origin,
bad input) always as one JSON error."""
from __future__ import annotations

import json
import time

import httpx
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from loopstream.cli.common import UserError  # noqa: E402
from loopstream.cli.ui import ui  # noqa: E402
from loopstream.core import events as ev  # noqa: E402
from loopstream.core.sqlite_log import SQLiteLog  # noqa: E402
from loopstream.providers.scripted import ScriptedProvider, adder_script, fanout_script  # noqa: E402
from loopstream.replay.fork import fork  # noqa: E402
from loopstream.runtime.assembly import build_runtime  # noqa: E402
from loopstream.runtime.inline import SessionConfig  # noqa: E402
from loopstream.runtime.writer import SessionWriter  # noqa: E402
from loopstream.tools.builtin import default_registry  # noqa: E402
from loopstream.web.guard import BindError, check_bind  # noqa: E402
from loopstream.web.links import LINKERS, Link, Links  # noqa: E402
from tests.web_helpers import ASK_ADD, post, serving, sse, wait_for  # noqa: E402

TOKEN = "t0ken-for-the-tests-0123456789"


@pytest.fixture
def db(tmp_path):
    return tmp_path / "log.db"


def status(client: httpx.Client, sid: str) -> str:
    return client.get(f"/api/sessions/{sid}").json()["status"]


def test_start_a_goal_stream_it_to_the_end_and_read_it(db):
    with serving(db) as server, httpx.Client(base_url=server.url) as c:
        made = post(c, "/api/sessions", {"goal": "count to 2"})
        assert made.status_code == 201
        sid = made.json()["session_id"]
        messages = sse(c, f"/api/sessions/{sid}/events")
        types = [m["type"] for kind, m in messages if kind == "event"]
        assert types[:2] == ["SessionStarted", "GoalReceived"] and types[-1] == "SessionFinished"
        assert [m["seq"] for kind, m in messages if kind == "event"] == list(range(len(types)))
        assert messages[-1] == ("end", {"status": "done"})
        read = c.get(f"/api/sessions/{sid}").json()
        assert read["status"] == "done" and read["ok"] and read["state"]["answer"] == "The result is 2."
        assert [e["type"] for e in read["events"]] == types
        assert read["events"][0]["payload"]["model"] == "scripted:adder:2"
        listed = c.get("/api/sessions").json()
        assert [s["session_id"] for s in listed["sessions"]] == [sid] and listed["sessions"][0]["status"] == "done"
        # a client that reconnects with the last id it saw gets only what came after it
        again = sse(c, f"/api/sessions/{sid}/events", headers={"Last-Event-ID": "3"})
        assert [m["seq"] for kind, m in again if kind == "event"][0] == 4


def test_list_filters_by_status_and_searches_goal_and_id(db):
    with serving(db, model="slow:30") as server, httpx.Client(base_url=server.url) as c:
        a = post(c, "/api/sessions", {"goal": "Find the LLAMA"}).json()["session_id"]
        b = post(c, "/api/sessions", {"goal": "something else"}).json()["session_id"]
        assert post(c, f"/api/sessions/{b}/cancel", {"reason": "test"}).json()["status"] == "cancelled"
        assert [s["session_id"] for s in c.get("/api/sessions", params={"q": "llama"}).json()["sessions"]] == [a]
        assert [s["session_id"] for s in c.get("/api/sessions", params={"q": b[:6]}).json()["sessions"]] == [b]
        assert [s["session_id"] for s in c.get("/api/sessions", params={"status": "cancelled"}).json()["sessions"]] == [b]
        assert [s["session_id"] for s in c.get("/api/sessions", params={"status": "running"}).json()["sessions"]] == [a]
        listed = c.get("/api/sessions").json()
        assert [s["session_id"] for s in listed["sessions"]] == [b, a] and listed["total"] == 2  # newest first
        post(c, f"/api/sessions/{a}/cancel", {})


def test_stream_shows_a_running_session_live_and_its_cancel(db):
    with serving(db, model="slow:1") as server, httpx.Client(base_url=server.url) as c:
        sid = post(c, "/api/sessions", {"goal": "slowly"}).json()["session_id"]
        seen: list[tuple[str, dict]] = []
        t0 = time.monotonic()
        with c.stream("GET", f"/api/sessions/{sid}/events", timeout=10) as response:
            kind, data = "", ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif line == "" and data:
                    seen.append((kind, json.loads(data)))
                    if kind == "event" and seen[-1][1]["type"] == "ModelRequested":
                        assert post(c, f"/api/sessions/{sid}/cancel", {"reason": "enough"}).status_code == 200
                    if kind == "end":
                        break
                    data = ""
        statuses = [m["status"] for kind, m in seen if kind == "status"]
        assert statuses[0] == "running" and statuses[-1] == "cancelled"
        assert [m["type"] for kind, m in seen if kind == "event"][-1] == "SessionCancelled"
        assert time.monotonic() - t0 < 5  # the cancel stopped the slow reply: no wait for it
        again = post(c, f"/api/sessions/{sid}/cancel", {})
        assert again.status_code == 409 and "already ended" in again.json()["error"]


@pytest.mark.parametrize("approved", [True, False])
def test_approve_or_deny_a_waiting_call(db, approved):
    with serving(db, model='calls:add:{"a": 40, "b": 2}', policy=ASK_ADD) as server, \
            httpx.Client(base_url=server.url) as c:
        sid = post(c, "/api/sessions", {"goal": "add"}).json()["session_id"]
        wait_for(lambda: status(c, sid) == "awaiting approval")
        (waiting,) = c.get(f"/api/sessions/{sid}").json()["state"]["waiting"]
        assert waiting["name"] == "add" and waiting["arguments"] == {"a": 40, "b": 2}
        wrong = post(c, f"/api/sessions/{sid}/approve", {"call_id": "nope"})
        assert wrong.status_code == 409 and "not waiting" in wrong.json()["error"]
        verb = "approve" if approved else "deny"
        decided = post(c, f"/api/sessions/{sid}/{verb}", {"call_id": waiting["call_id"], "reason": "test"})
        assert decided.status_code == 200 and decided.json()["approved"] is approved
        messages = sse(c, f"/api/sessions/{sid}/events")
        types = [m["type"] for kind, m in messages if kind == "event"]
        after = types[types.index("ApprovalDecided") + 1]
        assert after == ("ToolCompleted" if approved else "ToolFailed")
        decision = next(m for kind, m in messages if kind == "event" and m["type"] == "ApprovalDecided")
        assert decision["actor"] == "person:ui" and decision["payload"]["approved"] is approved
        answer = c.get(f"/api/sessions/{sid}").json()["state"]["answer"]
        assert answer == "42" if approved else "person:ui denied this call: test" in answer
        assert post(c, f"/api/sessions/{sid}/{verb}", {"call_id": waiting["call_id"]}).status_code == 409


def test_fork_tree_and_diff(db):
    with serving(db) as server, httpx.Client(base_url=server.url) as c:
        sid = post(c, "/api/sessions", {"goal": "count"}).json()["session_id"]
        sse(c, f"/api/sessions/{sid}/events")
        made = post(c, f"/api/sessions/{sid}/fork", {"at_seq": 3, "message": None, "run": True})
        assert made.status_code == 201
        child = made.json()["session_id"]
        assert sse(c, f"/api/sessions/{child}/events")[-1] == ("end", {"status": "done"})
        grandchild = post(c, f"/api/sessions/{child}/fork", {"at_seq": 5}).json()["session_id"]
        tree = c.get(f"/api/sessions/{grandchild}/tree").json()
        assert tree["session_id"] == sid and tree["kind"] == "root"
        (kid,) = tree["children"]
        assert (kid["session_id"], kid["kind"], kid["seq"]) == (child, "fork", 3)
        assert kid["children"][0]["session_id"] == grandchild and kid["children"][0]["current"]
        assert c.get(f"/api/sessions/{child}").json()["parent"] == {"session_id": sid, "seq": 3, "kind": "fork"}
        diff = c.get("/api/diff", params={"a": sid, "b": child}).json()
        assert diff["identical"] and diff["relation"] == "b is a fork of a at seq 3" and "fork" in diff["text"]
        assert status(c, grandchild) == "interrupted"  # forked without `run`: nothing drives it
        assert post(c, f"/api/sessions/{grandchild}/resume", {}).json()["running"] is True
        assert sse(c, f"/api/sessions/{grandchild}/events")[-1] == ("end", {"status": "done"})
        assert post(c, f"/api/sessions/{grandchild}/resume", {}).status_code == 409
        bad = post(c, f"/api/sessions/{sid}/fork", {"at_seq": 999})
        assert bad.status_code == 409 and "cannot fork at 999" in bad.json()["error"]
        assert post(c, f"/api/sessions/{sid}/fork", {"at_seq": "3"}).status_code == 400
        for choice in ({"model": "reads:/etc/passwd"}, {"provider": "openai"}):
            refused = post(c, f"/api/sessions/{sid}/fork", {"at_seq": 3, "run": True, **choice})
            assert refused.status_code == 400 and "may not be chosen here" in refused.json()["error"]


def test_feedback_and_eval_reports(db):
    with serving(db) as server, httpx.Client(base_url=server.url) as c:
        sid = post(c, "/api/sessions", {"goal": "count"}).json()["session_id"]
        sse(c, f"/api/sessions/{sid}/events")
        assert post(c, f"/api/sessions/{sid}/feedback", {"score": 0.5, "comment": "ok"}).status_code == 201
        assert post(c, f"/api/sessions/{sid}/feedback", {"score": "high"}).status_code == 400
        log = SQLiteLog(db)
        SessionWriter(log).record(sid, [ev.EvalGraded(suite="s", case_id="c", variant="A", trial=0, grader="g",
                                                      kind="exact", passed=False, score=0.0, detail="")], "eval")
        log.close()
        (suite,) = c.get("/api/evals").json()["suites"]
        assert suite == {"suite": "s", "variant": "A", "sessions": 1, "verdicts": 1, "passed": 0,
                         "failing": [sid], "pass_rate": 0.0}
        types = [e["type"] for e in c.get(f"/api/sessions/{sid}").json()["events"]]
        assert types[-2:] == ["FeedbackGiven", "EvalGraded"] and c.get(f"/api/sessions/{sid}").json()["status"] == "done"


def test_hostile_text_goes_out_as_escaped_json(db):
    goal = "<script>alert(1)</script><img src=x onerror=alert(2)> \ud800 \u202e" + "x" * 100_000
    with serving(db) as server, httpx.Client(base_url=server.url) as c:
        sid = post(c, "/api/sessions", {"goal": goal}).json()["session_id"]
        response = c.get(f"/api/sessions/{sid}")
        assert response.headers["content-type"] == "application/json"
        assert response.content.isascii() and b"<script>" in response.content  # data, not a page: the page escapes
        stored = response.json()["goal"]  # as the writer stores it: capped, lone surrogates replaced
        assert stored.startswith(goal[:70].replace("\ud800", "\ufffd")) and "characters cut" in stored
        page = c.get("/")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"


def test_errors_are_one_json_line(db):
    with serving(db) as server, httpx.Client(base_url=server.url) as c:
        cases = [
            (c.get("/api/sessions/nope"), 404, "no session"),
            (c.get("/api/nothing-here"), 404, "Not Found"),
            (c.get("/api/sessions/nope/events"), 404, "no session"),
            (c.request("DELETE", "/api/sessions", headers={"content-type": "application/json"}), 405, "Method Not Allowed"),
            (c.post("/api/sessions", content=b"{", headers={"content-type": "application/json"}), 400, "not valid JSON"),
            (c.post("/api/sessions", content=b"\xff", headers={"content-type": "application/json"}), 400, "not valid JSON"),
            (post(c, "/api/sessions", [1]), 400, "JSON object"),
            (post(c, "/api/sessions", {}), 400, "goal: required"),
            (post(c, "/api/sessions", {"goal": 5}), 400, "goal: a string"),
            (post(c, "/api/sessions", {"goal": "  "}), 400, "goal is empty"),
            (post(c, "/api/sessions", {"goal": "x", "model": "reads:/etc/passwd"}), 400, "may not be chosen here"),
            (c.post("/api/sessions", data={"goal": "x"}), 415, "send JSON"),
            (c.get("/api/sessions", params={"limit": "x"}), 400, "limit"),
            (c.get("/api/diff", params={"a": "x"}), 404, "no session"),
        ]
        for response, code, text in cases:
            assert response.status_code == code, response.text
            assert response.headers["content-type"] == "application/json"
            assert text in response.json()["error"] and response.json()["status"] == code
        assert c.get("/api/sessions").json()["total"] == 0


def test_another_origin_or_host_is_refused(db):
    with serving(db) as server, httpx.Client(base_url=server.url) as c:
        foreign = c.post("/api/sessions", content=b'{"goal": "x"}',
                         headers={"content-type": "application/json", "origin": "http://evil.example"})
        assert foreign.status_code == 403 and "origin" in foreign.json()["error"]
        rebound = c.get("/api/sessions", headers={"host": "evil.example:8765"})  # DNS rebinding
        assert rebound.status_code == 421
        same = c.post("/api/sessions", content=b'{"goal": "x"}',
                      headers={"content-type": "application/json", "origin": server.url})
        assert same.status_code == 201


def test_a_token_is_required_when_set_and_off_loopback():
    with pytest.raises(BindError, match="not a loopback address"):
        check_bind("0.0.0.0", None)
    with pytest.raises(BindError, match="at least 16"):
        check_bind("0.0.0.0", "short")
    check_bind("0.0.0.0", TOKEN)
    check_bind("::1", None)
    check_bind("localhost", None)


def test_the_api_checks_the_token(db):
    with serving(db, token=TOKEN) as server, httpx.Client(base_url=server.url) as c:
        assert c.get("/api/sessions").status_code == 401
        assert c.get("/api/sessions", headers={"authorization": "Bearer " + TOKEN[:-1] + "x"}).status_code == 401
        assert c.get("/api/sessions", headers={"authorization": "Basic " + TOKEN}).status_code == 401
        assert c.get("/api/sessions", headers={"authorization": "Bearer " + TOKEN}).status_code == 200
        assert c.get("/").status_code == 200  # the page holds no data; its calls send the token


def test_ui_refuses_a_network_address_without_a_token(tmp_path):
    # the command itself (a UserError is one line on stderr and exit code 2: cli/app.py)
    with pytest.raises(UserError, match="not a loopback address"):
        ui(host="0.0.0.0", db=tmp_path / "l.db")
    with pytest.raises(UserError, match="at least 16"):
        ui(host="0.0.0.0", token="short", db=tmp_path / "l.db")
    assert not (tmp_path / "l.db").exists()  # refused before anything was opened


def test_a_damaged_session_is_shown_up_to_its_bad_event(db):
    with serving(db) as server, httpx.Client(base_url=server.url) as c:
        sid = post(c, "/api/sessions", {"goal": "count"}).json()["session_id"]
        sse(c, f"/api/sessions/{sid}/events")
        log = SQLiteLog(db)
        with log.transaction() as conn:
            conn.execute("UPDATE events SET data = ? WHERE session_id = ? AND seq = 5", (b"\x00garbage", sid))
        log.close()
        read = c.get(f"/api/sessions/{sid}")
        assert read.status_code == 200 and not read.json()["ok"] and "first bad seq 5" in read.json()["problem"]
        assert [e["seq"] for e in read.json()["events"]] == [0, 1, 2, 3, 4]
        messages = sse(c, f"/api/sessions/{sid}/events", until="problem")
        assert [m["seq"] for kind, m in messages if kind == "event"] == [0, 1, 2, 3, 4]
        assert messages[-1][0] == "problem" and messages[-1][1]["seq"] == 5
        assert c.get("/api/sessions").json()["sessions"][0]["session_id"] == sid  # the list still lists it


def test_links_are_read_incrementally_and_take_other_kinds_of_child(db):
    log = SQLiteLog(db)
    runtime = build_runtime(log, ScriptedProvider(adder_script(1)), default_registry().select(["add"]))
    root = runtime.start_session("root", SessionConfig(provider="scripted", model="adder:1", tools=["add"]))
    runtime.run_session(root)
    # a sub-agent's start, say, as another event type: here a UserMessage naming its parent
    linkers = {**LINKERS, "UserMessage": lambda e: Link(e.session_id, e.payload.text.removeprefix("child of "),
                                                        None, "subagent")
               if e.payload.text.startswith("child of ") else None}
    found = Links(linkers)
    assert found.read(log) == {}
    child = fork(log, root, 3).child_session_id
    assert found.read(log) == {child: Link(child, root, 3, "fork")}
    helper = runtime.start_session("helper", SessionConfig(provider="scripted", model="adder:1", tools=["add"]))
    runtime.writer.record(helper, [ev.UserMessage(text=f"child of {child}")], actor="test")
    grandchild = fork(log, child, 4).child_session_id  # carries the copied SessionForked of `child` first
    now = found.read(log)
    assert now[helper] == Link(helper, child, None, "subagent") and now[grandchild] == Link(grandchild, child, 4, "fork")
    assert found.read(log) == now  # nothing new: nothing changes
    log.close()


def test_a_tree_of_sub_agents_is_drawn_from_their_starts(db):
    log = SQLiteLog(db)
    runtime = build_runtime(log, ScriptedProvider(fanout_script(3)))
    parent = runtime.start_session("sum three sums", SessionConfig(provider="scripted", model="fanout",
                                                                   tools=["add", "spawn_agents"]))
    assert runtime.run_session(parent).status == "done"
    started = next(e.payload for e in log.read(parent) if e.type == "ChildrenStarted")
    children = [c.session_id for c in started.children]
    log.close()
    with serving(db) as server, httpx.Client(base_url=server.url) as c:
        tree = c.get(f"/api/sessions/{children[1]}/tree").json()
        assert tree["session_id"] == parent and tree["kind"] == "root"
        assert sorted(k["session_id"] for k in tree["children"]) == sorted(children)
        assert {k["kind"] for k in tree["children"]} == {"subagent"}
        assert c.get(f"/api/sessions/{children[0]}").json()["parent"]["session_id"] == parent
