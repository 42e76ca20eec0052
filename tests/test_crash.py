"""Crash safety: SIGKILL the runtime at every event boundary (and inside model calls),
start it again, and the session finishes with nothing lost and nothing duplicated."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loopstream.core.sqlite_log import SQLiteLog

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def drive(db: Path, sid: str, mode: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.crash_driver", str(db), sid, mode, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def history(db: Path, sid: str) -> list[tuple[int, str]]:
    with SQLiteLog(db) as log:
        events = log.read(sid)
    ids = [e.event_id for e in events]
    assert len(ids) == len(set(ids)), "an event id was stored twice"
    assert [e.seq for e in events] == list(range(len(events))), "seqs are not gapless"
    return [(e.seq, e.type) for e in events]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[tuple[int, str]]:
    db = tmp_path_factory.mktemp("ref") / "ref.db"
    r = drive(db, "ref", "start")
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr
    return history(db, "ref")


def test_kill_at_every_event_boundary_then_resume(tmp_path: Path, reference) -> None:
    db = tmp_path / "crash.db"
    for n in range(1, len(reference)):
        sid = f"kill{n}"
        killed = drive(db, sid, "start", "--kill-after-events", str(n))
        assert killed.returncode == -signal.SIGKILL, (n, killed.stderr)
        assert len(history(db, sid)) >= n  # what was appended before the kill survived
        resumed = drive(db, sid, "resume")
        assert resumed.returncode == 0 and resumed.stdout.strip() == "done", (n, resumed.stderr)
        assert history(db, sid) == reference, f"killed after event {n}"


def test_kill_inside_model_calls_then_resume(tmp_path: Path, reference) -> None:
    db = tmp_path / "crash.db"
    model_calls = sum(1 for _, t in reference if t == "ModelRequested")
    for k in range(1, model_calls + 1):
        sid = f"model{k}"
        killed = drive(db, sid, "start", "--kill-in-model-call", str(k))
        assert killed.returncode == -signal.SIGKILL
        assert history(db, sid)[-1][1] == "ModelRequested"  # the request is logged, its reply is not
        resumed = drive(db, sid, "resume")
        assert resumed.returncode == 0 and resumed.stdout.strip() == "done", resumed.stderr
        assert history(db, sid) == reference


def test_in_flight_side_effect_tools_follow_their_policy(tmp_path: Path) -> None:
    """Killed right after a tool's checkpoint (it counts as started): on resume the
    non-idempotent shell call is reported "outcome_unknown" and not run twice; the
    idempotent write_file runs again."""
    db = tmp_path / "sfx.db"
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    assert drive(db, "ref", "start", "--side-effects", str(ref_dir)).returncode == 0
    ref = history(db, "ref")
    checkpoints = [seq for seq, t in ref if t == "WorkspaceCheckpointed"]
    assert len(checkpoints) == 2 and (ref_dir / "ran.txt").read_text() == "ran\n"
    for which, boundary in zip(("shell", "write_file"), checkpoints):
        work = tmp_path / which
        work.mkdir()
        sid = f"sfx-{which}"
        killed = drive(db, sid, "start", "--side-effects", str(work), "--kill-after-events", str(boundary + 1))
        assert killed.returncode == -signal.SIGKILL
        resumed = drive(db, sid, "resume", "--side-effects", str(work))
        assert resumed.returncode == 0 and resumed.stdout.strip() == "done", resumed.stderr
        with SQLiteLog(db) as log:
            after = log.read(sid)[boundary + 1]
        if which == "shell":
            assert after.type == "ToolFailed" and after.payload.error_kind == "outcome_unknown"
            assert not (work / "ran.txt").exists()  # killed before it ran, and not run blindly after
        else:
            assert after.type == "ToolCompleted" and (work / "out.txt").read_text() == "hi"


@pytest.mark.kafka
def test_kill_at_every_event_boundary_over_kafka(tmp_path: Path, kafka_broker: str) -> None:
    """The same kill-at-every-boundary test with the log on a real Kafka-protocol broker."""
    from loopstream.kafka.log import KafkaLog

    topic = f"crash-{tmp_path.name}"[:60]
    kafka = ["--kafka", kafka_broker, "--topic", topic, "--tool-steps", "1"]

    def kafka_history(sid: str) -> list[tuple[int, str]]:
        with KafkaLog(kafka_broker, topic=topic, projection_path=tmp_path / "reader.db", partitions=1) as log:
            events = log.read(sid)
        assert len({e.event_id for e in events}) == len(events), "an event id was stored twice"
        assert [e.seq for e in events] == list(range(len(events))), "seqs are not gapless"
        return [(e.seq, e.type) for e in events]

    proj = tmp_path / "proj.db"
    ref = drive(proj, "kref", "start", *kafka)
    assert ref.returncode == 0 and ref.stdout.strip() == "done", ref.stderr
    reference = kafka_history("kref")
    assert len(reference) == 9
    for n in range(1, len(reference)):
        sid = f"kkill{n}"
        killed = drive(proj, sid, "start", *kafka, "--kill-after-events", str(n))
        assert killed.returncode == -signal.SIGKILL, (n, killed.stderr)
        resumed = drive(proj, sid, "resume", *kafka)
        assert resumed.returncode == 0 and resumed.stdout.strip() == "done", (n, resumed.stderr)
        assert kafka_history(sid) == reference, f"killed after event {n}"
