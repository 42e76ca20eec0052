"""The log conformance suite against the embedded SQLite log (one file per test)."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest

from loopstream.core.log import DuplicateEvent
from loopstream.core.sqlite_log import SQLiteLog
from tests.log_conformance import LogConformance, Opener, events, sid


class TestSQLiteLog(LogConformance):
    race_rounds = 200
    delivery_timeout = 5.0

    @pytest.fixture
    def opener(self, tmp_path: Path) -> Opener:
        return partial(SQLiteLog, tmp_path / "log.db")


def test_a_duplicate_inside_a_batch_leaves_none_of_it_in_the_callers_transaction(tmp_path: Path) -> None:
    """`insert` finds a duplicate id by the unique index: the rows of the batch that went in
    before it are taken back, so a caller that goes on (the Kafka projection) keeps none."""
    with SQLiteLog(tmp_path / "log.db") as log:
        a, b = sid(), sid()
        log.append(a, events(a, 0, 2), 0)
        batch = events(b, 0, 3)
        batch[2] = batch[2].model_copy(update={"event_id": log.read(a)[1].event_id})  # the third is a's
        with log.transaction() as conn:
            with pytest.raises(DuplicateEvent):
                log.insert(b, batch, 0)
            conn.execute("INSERT INTO offsets (group_name, gpos) VALUES ('g', 7)")  # the caller goes on
        assert log.read(b) == [] and log.next_seq(b) == 0 and len(log.read(a)) == 2
        assert log.db.conn.execute("SELECT gpos FROM offsets WHERE group_name = 'g'").fetchone() == (7,)
        log.append(b, events(b, 0, 3), 0)  # the session's seqs are free for its real batch
        assert [e.seq for e in log.read(b)] == [0, 1, 2]
