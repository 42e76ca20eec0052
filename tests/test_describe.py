"""One summary per payload (core/describe.py), and `show`, `replay` and `diff` printing it."""
from __future__ import annotations

import pytest

from loopstream.core import events as ev
from loopstream.core.describe import SUMMARIES, status_of, summarize, summary
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.providers.scripted import ScriptedProvider, adder_script
from loopstream.replay import diff, replay
from loopstream.replay.replayer import Note
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig
from tests.helpers import SAMPLE_PAYLOADS, make_event


def test_every_event_type_has_its_own_summary() -> None:
    assert set(SUMMARIES) == set(ev.PAYLOAD_TYPES.values())


@pytest.mark.parametrize("payload", SAMPLE_PAYLOADS, ids=lambda p: p.TYPE)
def test_a_summary_is_one_line_within_its_width_and_says_what_happened(payload: ev.Payload) -> None:
    hostile = {k: "x\n\x1b[31m" + "y" * 500 for k, v in payload.model_dump().items() if isinstance(v, str)}
    for p in (payload, payload.model_copy(update=hostile)):
        line = summarize(make_event(p), 60)
        assert "\n" not in line and len(line) <= 60
    fields = payload.model_dump()
    said = summary(payload)
    assert any(str(v) in said for v in fields.values() if isinstance(v, (str, int)) and str(v) not in ("", "0"))


def test_a_fork_with_unreadable_overrides_still_has_a_summary() -> None:
    p = ev.SessionForked(parent_session_id="p", parent_seq=3, parent_event_hash="ab" * 32, reason="r",
                         overrides_json="{not json", acknowledged_side_effects_json="[]")
    assert summary(p).startswith("fork of p at seq 3")


def test_status_of_a_session_list_comes_from_the_table() -> None:
    assert {t: status_of(t) for t in ev.PAYLOAD_TYPES if status_of(t) != "running"} == {
        "SessionFinished": "done", "SessionFailed": "failed", "SessionCancelled": "cancelled",
        "ApprovalRequested": "awaiting approval", "GoalPaused": "paused",
    }


def test_replay_and_diff_print_the_same_summaries(tmp_path) -> None:
    with SQLiteLog(tmp_path / "d.db") as log:
        sids = []
        for steps in (2, 3):
            rt = build_runtime(log, ScriptedProvider(adder_script(steps)))
            sids.append(rt.start_session("count", SessionConfig(provider="scripted", model="s", tools=["add"],
                                                                workdir=str(tmp_path))))
            rt.run_session(sids[-1])
        report = replay(log, sids[0])
        by_seq = {e.seq: e for e in report.events}
        notes = [item for item in report.timeline if isinstance(item, Note)]
        assert {n.type for n in notes} >= {"SessionStarted", "GoalReceived", "SessionFinished"}
        for note in notes:
            assert note.text == summary(by_seq[note.seq].payload)
        d = diff(log, sids[0], sids[1]).divergence
        assert d is not None
        assert d.a == f"seq {d.seq_a} ModelResponded {summarize(by_seq[d.seq_a], 160)}"
