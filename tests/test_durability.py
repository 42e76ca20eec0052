"""The `durability` choice of the SQLite log (docs/performance.md#durability): what each
setting asks SQLite for, how a wrong value is refused, and that every event an append
returned for survives a writer process killed with SIGKILL in the middle of its run.

A killed process is what a test can do for real; an OS crash or a power loss (where "full"
and "normal" differ) cannot be produced here and is documented, not tested."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loopstream.core.codec import decode
from loopstream.core.sqlite_log import SQLiteLog
from tests.log_conformance import events, sid
from tests.test_cli import cli

ROOT = Path(__file__).resolve().parent.parent

WRITER = textwrap.dedent("""
    import sys
    from loopstream.core.sqlite_log import SQLiteLog
    from tests.log_conformance import events
    path, durability, session = sys.argv[1:4]
    log = SQLiteLog(path, durability=durability)
    seq = log.next_seq(session)
    while True:
        batch = events(session, seq, 1 + seq % 3)  # batches of 1 to 3 events
        log.append(session, batch, seq)
        print(" ".join(f"{e.seq}:{e.event_id}" for e in batch), flush=True)  # only once append returned
        seq += len(batch)
""")


@pytest.mark.parametrize("durability, synchronous", [("normal", 1), ("full", 2), ("FULL", 2), (None, 1)])
def test_each_durability_sets_the_wal_synchronous_level(tmp_path: Path, durability, synchronous) -> None:
    with SQLiteLog(tmp_path / "l.db", durability=durability) as log:
        assert log.db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert log.db.conn.execute("PRAGMA synchronous").fetchone()[0] == synchronous
        assert log.durability == (durability or "normal").lower()


@pytest.mark.parametrize("bad", ["", "fsync", "off", "extra", "normal; DROP TABLE events", "\ud800"])
def test_a_wrong_durability_is_refused_in_one_line_before_anything_is_created(tmp_path: Path, bad: str) -> None:
    if bad == "":  # empty: the default, as an unset environment variable
        SQLiteLog(tmp_path / "l.db", durability=bad).close()
        return
    with pytest.raises(ValueError, match="durability must be one of normal, full") as err:
        SQLiteLog(tmp_path / "l.db", durability=bad)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "l.db").exists()


@pytest.mark.parametrize("durability", ["full", "normal"])
def test_every_append_that_returned_survives_a_writer_killed_mid_run(tmp_path: Path, durability: str) -> None:
    db, session = tmp_path / "l.db", sid()
    for _round in range(3):  # killed three times, at whatever point each run has reached
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(db), durability, session], cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        returned: dict[int, str] = {}
        try:
            for line in child.stdout:
                returned.update((int(s), i) for s, i in (p.split(":") for p in line.split()))
                if len(returned) >= 150:
                    break
            child.send_signal(signal.SIGKILL)  # mid-run: it is appending its next batch
        finally:
            child.kill()
            child.wait()
        with SQLiteLog(db, durability=durability) as log:
            assert log.db.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stored = {e.seq: e.event_id for e in log.read(session)}
            assert {s: stored.get(s) for s in returned} == returned  # every acknowledged event, as written
            assert sorted(stored) == list(range(len(stored))) == list(range(log.next_seq(session)))
            raw = log.db.conn.execute("SELECT data FROM events WHERE session_id = ?", (session,)).fetchall()
            assert all(decode(r[0]).session_id == session for r in raw)
            log.append(session, events(session, len(stored), 1), len(stored))  # and it goes on


def test_run_takes_durability_from_the_flag_or_the_environment_and_refuses_a_wrong_one(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    ok = cli("run", "count", "--provider", "scripted", "--model", "adder:2", "--db", str(db), "-q",
             "--durability", "full", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    ok = cli("run", "count", "--provider", "scripted", "--model", "adder:2", "--db", str(db), "-q", cwd=tmp_path,
             env={"LOOPSTREAM_DURABILITY": "normal"})
    assert ok.returncode == 0, ok.stderr
    for args, env in ((["--durability", "fsync"], None), ([], {"LOOPSTREAM_DURABILITY": "sometimes"})):
        bad = cli("run", "count", "--provider", "scripted", "--db", str(tmp_path / "other.db"), *args,
                  cwd=tmp_path, env=env)
        assert bad.returncode == 2
        assert bad.stderr.strip().count("\n") == 0 and "durability must be one of normal, full" in bad.stderr
        assert "Traceback" not in bad.stderr and not (tmp_path / "other.db").exists()
