"""Traces sent to a real OTLP receiver: Arize Phoenix (the `[otel-test]` extra), started on a
free loopback port by the `phoenix` fixture (tests/fixtures_phoenix.py); what it stored is
read back through its REST API: span names, parent/child structure, gen_ai.* attributes,
error statuses, and that sending a session again stores nothing twice."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from loopstream.core.sqlite_log import SQLiteLog
from loopstream.observe.spans import trace_id
from loopstream.providers.scripted import ScriptedProvider, slow_script
from tests.fixtures_phoenix import free_port
from tests.observe_sessions import rich_session, run_session

otlp = pytest.importorskip("loopstream.observe.otlp", reason="needs the [otel] extra")


def by_name(spans: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for s in spans:
        out.setdefault(s["name"], []).append(s)
    return out


def test_a_session_with_a_retry_and_a_tool_failure_arrives_as_one_trace(tmp_path: Path, phoenix) -> None:
    db = tmp_path / "log.db"
    sid = rich_session(db)
    with SQLiteLog(db) as log:
        sent = otlp.export_session(log, sid, otlp.exporter(phoenix.url), project="rich")
    assert sent.spans == 11 and sent.status == "done"
    spans = phoenix.wait_spans("rich", 11)
    assert len(spans) == 11
    assert {s["context"]["trace_id"] for s in spans} == {f"{trace_id(sid):032x}"}
    names = by_name(spans)
    (root,) = names["invoke_agent default"]
    assert root["parent_id"] is None and root["attributes"]["gen_ai.agent.name"] == "default"
    ids = {s["context"]["span_id"]: s for s in spans}
    steps = [names[f"step {n}"][0] for n in (1, 2, 3)]
    assert all(s["parent_id"] == root["context"]["span_id"] for s in steps)
    chats = names["chat scripted:rich"]
    assert len(chats) == 4 and all(ids[c["parent_id"]]["name"].startswith("step ") for c in chats)
    failed = [c for c in chats if c["status_code"] == "ERROR"]
    assert len(failed) == 1 and failed[0]["attributes"]["error.type"] == "server_error"
    answered = [c for c in chats if c["status_code"] != "ERROR"]
    for c in answered:
        a = c["attributes"]
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.system"] == "scripted"
        assert a["gen_ai.request.model"] == "scripted:rich" and a["gen_ai.response.finish_reasons"]
        assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert sum(c["attributes"]["gen_ai.usage.input_tokens"] for c in answered) == 120
    (retry,) = names["retry model"]
    assert ids[retry["parent_id"]]["name"] == "step 1" and retry["attributes"]["loopstream.retry.attempt"] == 2
    (divide,) = names["execute_tool divide"]
    (add,) = names["execute_tool add"]
    assert divide["status_code"] == "ERROR" and divide["attributes"]["gen_ai.tool.name"] == "divide"
    assert add["status_code"] != "ERROR" and add["attributes"]["gen_ai.operation.name"] == "execute_tool"
    assert ids[add["parent_id"]]["name"] == "step 2"

    # Sent again, through the CLI: the same ids, so Phoenix keeps one copy of each span.
    out = subprocess.run([sys.executable, "-m", "loopstream.cli.app", "trace", sid[:10], "--otlp", phoenix.url,
                          "--project", "rich", "--db", str(db)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"sent 11 spans of session {sid} (done)" in out.stdout
    assert len(phoenix.wait_spans("rich", 12, timeout=3)) == 11


def test_follow_sends_the_spans_of_a_live_session_as_they_end(tmp_path: Path, phoenix) -> None:
    db = tmp_path / "log.db"
    with SQLiteLog(db) as log:
        writer_done = threading.Event()
        started: list[str] = []

        def drive() -> None:
            with SQLiteLog(db) as own:
                started.append(run_session(own, "count slowly", ScriptedProvider(slow_script("0.4"), model="slow")))
            writer_done.set()

        t = threading.Thread(target=drive)
        t.start()
        while not log.sessions():
            writer_done.wait(0.05)
        sid = log.sessions()[0].session_id
        sent = otlp.follow_session(log, sid, otlp.exporter(phoenix.url), project="live", poll_s=0.1)
        t.join(30)
    assert sent.status == "done" and started == [sid]
    spans = phoenix.wait_spans("live", sent.spans)
    assert len(spans) == sent.spans == 6  # session, two steps, two chats, one tool call
    assert {s["name"] for s in spans} == {"invoke_agent default", "step 1", "step 2", "chat slow", "execute_tool add"}


def test_a_receiver_that_is_not_there_is_one_line(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    sid = rich_session(db)

    url = f"http://127.0.0.1:{free_port()}"
    out = subprocess.run([sys.executable, "-m", "loopstream.cli.app", "trace", sid, "--otlp", url, "--db", str(db)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "did not take 11 spans" in out.stderr and "Traceback" not in out.stderr
    bad = subprocess.run([sys.executable, "-m", "loopstream.cli.app", "trace", sid, "--otlp", "ftp://x",
                          "--db", str(db)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "an http:// or https:// URL" in bad.stderr
