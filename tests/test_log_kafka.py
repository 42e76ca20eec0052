"""The log conformance suite against KafkaLog on a real broker (Tansu), plus the Kafka-only
parts: the acceptance rule that resolves racing writers, and byte identity with SQLite.

Needs the `kafka_broker` fixture from tests/fixtures_kafka.py (loaded by tests/conftest.py).
"""
from __future__ import annotations

import uuid
from functools import partial
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("confluent_kafka", reason="needs confluent-kafka")

from confluent_kafka import Consumer, TopicPartition

from loopstream.core.codec import encode
from loopstream.core.log import ConcurrencyError, DuplicateEvent, LogError
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.kafka.log import (
    ACCEPTED,
    DROPPED,
    PENDING,
    KafkaLog,
    Projection,
    Record,
    murmur2,
    partition_for,
)
from tests.log_conformance import LogConformance, Opener, drain, event, events, sid

# Tansu answers a JoinGroup after about half the session timeout: keep it short in tests.
FAST_GROUPS = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500, "fetch.wait.max.ms": 20}


def topic() -> str:
    return "t." + uuid.uuid4().hex[:12]


@pytest.mark.kafka
class TestKafkaLog(LogConformance):
    race_rounds = 25

    @pytest.fixture
    def opener(self, kafka_broker: str) -> Opener:
        return partial(KafkaLog, kafka_broker, topic=topic(), consumer_config=FAST_GROUPS)

    def after_race(self, log: KafkaLog, session_id: str, conflicts: int) -> None:
        # Races lost after producing are in the topic but dropped by the rule, and each
        # of them was reported to its writer as a conflict.
        dropped = log.dropped()
        print(f"race: {len(dropped)} records lost a race after reaching the topic")
        assert {d["reason"] for d in dropped} <= {"conflict"}
        assert all(d["session_id"] == session_id for d in dropped)
        assert len(dropped) <= conflicts


@pytest.mark.kafka
class TestKafkaSpecifics:
    def test_topic_is_keyed_by_session_and_values_are_the_sqlite_bytes(self, kafka_broker: str, tmp_path: Path) -> None:
        t, s = topic(), sid()
        batch = events(s, 0, 3)
        with KafkaLog(kafka_broker, topic=t, partitions=3) as klog, SQLiteLog(tmp_path / "l.db") as slog:
            klog.append(s, batch, 0)
            slog.append(s, batch, 0)
            assert klog.read_raw(s) == slog.read_raw(s) == [encode(e) for e in batch]
            p = klog.partition(s)
        c = Consumer({"bootstrap.servers": kafka_broker, "group.id": "raw", "enable.auto.commit": False})
        try:
            c.assign([TopicPartition(t, p, 0)])
            msgs = []
            while len(msgs) < 3:
                m = c.poll(5)
                assert m is not None
                if not m.error():
                    msgs.append(m)
        finally:
            c.close()
        assert [m.key() for m in msgs] == [s.encode()] * 3
        assert [m.value() for m in msgs] == [encode(e) for e in batch]
        assert dict(msgs[0].headers())["ls.type"] == b"GoalReceived"

    def test_a_lost_race_is_an_error_and_every_reader_drops_it(self, kafka_broker: str, tmp_path: Path) -> None:
        t, s = topic(), sid()
        opener = partial(KafkaLog, kafka_broker, topic=t, consumer_config=FAST_GROUPS)
        winner, loser = opener(), opener()
        try:
            winner.append(s, [event(s, 0)], 0)
            # The loser's pre-check ran before the winner's record arrived: simulate that by
            # producing without it, as a racing process would.
            late = event(s, 0, "late")
            offsets = loser._produce(s, [late])
            loser.catch_up(until={loser.partition(s): offsets[-1] + 1})
            assert loser.projection.verdict(loser.partition(s), offsets[0]) == (DROPPED, "conflict")
            # Through append, the same race surfaces as ConcurrencyError.
            store, checks = loser.projection.store, []

            def stale_first(*args) -> None:  # the pre-check sees a stale view; the verdict does not
                checks.append(args)
                if len(checks) > 1:
                    SQLiteLog.check(store, *args)

            store.check = stale_first  # type: ignore[method-assign]
            with pytest.raises(ConcurrencyError):
                loser.append(s, [event(s, 0, "also late")], 0)
            del store.check
            assert len(checks) == 2
            # Every reader converges on the winner's history, fresh ones included.
            for log in (winner, loser):
                assert [e.payload.text for e in log.read(s)] == ["goal 0"]
            fresh = KafkaLog(kafka_broker, topic=t, projection_path=tmp_path / "p.db", consumer_config=FAST_GROUPS)
            try:
                assert [e.payload.text for e in fresh.read(s)] == ["goal 0"]
                assert [d["reason"] for d in fresh.dropped()] == ["conflict", "conflict"]
                winner.append(s, [event(s, 1)], 1)
                sub = fresh.subscribe("g-" + uuid.uuid4().hex[:8])
                got = drain(sub, 2)
                assert [(d.event.seq, d.event.payload.text) for d in got] == [(0, "goal 0"), (1, "goal 1")]
            finally:
                fresh.close()
        finally:
            winner.close()
            loser.close()

    def test_projection_file_resumes_where_it_stopped(self, kafka_broker: str, tmp_path: Path) -> None:
        t, s = topic(), sid()
        path = tmp_path / "projection.db"
        with KafkaLog(kafka_broker, topic=t, projection_path=path) as log:
            log.append(s, events(s, 0, 4), 0)
            pos = log.projection.positions()
        assert sum(pos.values()) == 4
        with KafkaLog(kafka_broker, topic=t, projection_path=path) as log:
            assert log._pos == {p: pos.get(p, 0) for p in range(log.partitions)}  # no re-scan
            assert [e.seq for e in log.read(s)] == [0, 1, 2, 3]


# -- the acceptance rule, without a broker --------------------------------------------------
def rec(off: int, e, *, batch: str | None = None, i: int = 0, n: int = 1, writer: str = "w1",
        ts: int = 1_000, part: int = 0) -> Record:
    h = {"ls.batch": batch or uuid.uuid4().hex, "ls.i": str(i), "ls.n": str(n), "ls.writer": writer}
    return Record(part, off, ts + off, encode(e), h)


class TestAcceptanceRule:
    @pytest.fixture
    def proj(self) -> Projection:
        p = Projection(None, "t")
        yield p
        p.close()

    def test_first_record_per_seq_wins_later_ones_are_dropped(self, proj: Projection) -> None:
        s = sid()
        a0, b0, a1 = event(s, 0, "a"), event(s, 0, "b"), event(s, 1, "a1")
        proj.apply([rec(0, a0, writer="A"), rec(1, b0, writer="B"), rec(2, a1, writer="A"),
                    rec(3, a0, writer="C")])
        assert proj.read_raw(s) == [encode(a0), encode(a1)]
        assert [(d["offset"], d["reason"]) for d in proj.dropped()] == [(1, "conflict"), (3, "duplicate")]
        assert proj.verdict(0, 0) == (ACCEPTED, None) and proj.verdict(0, 1) == (DROPPED, "conflict")
        assert proj.verdict(0, 4) is None

    def test_batches_are_decided_whole_when_complete(self, proj: Projection) -> None:
        s = sid()
        x = [event(s, 0, "x0"), event(s, 1, "x1")]
        y = event(s, 0, "y")
        # X's records interleave with Y's; Y completes first, so X loses as a whole.
        proj.apply([rec(0, x[0], batch="X", i=0, n=2, writer="A"), rec(1, y, writer="B")])
        assert proj.verdict(0, 0) == (PENDING, None)
        proj.apply([rec(2, x[1], batch="X", i=1, n=2, writer="A")])
        assert proj.read_raw(s) == [encode(y)]
        assert {d["offset"] for d in proj.dropped()} == {0, 2}
        z = [event(s, 1, "z1"), event(s, 2, "z2")]
        proj.apply([rec(3, z[0], batch="Z", i=0, n=2), rec(4, z[1], batch="Z", i=1, n=2)])
        assert proj.read_raw(s) == [encode(y), encode(z[0]), encode(z[1])]
        assert proj.sessions()[0].next_seq == 3

    def test_incomplete_batches_are_abandoned_deterministically(self, proj: Projection) -> None:
        s, t = sid(), sid()
        proj.apply([rec(0, event(s, 0), batch="P", i=0, n=2, writer="A")])
        proj.apply([rec(1, event(t, 0), writer="B")])  # another writer: P may still complete
        assert proj.verdict(0, 0) == (PENDING, None)
        retry = event(s, 0, "retry")
        proj.apply([rec(2, retry, writer="A")])  # A moved on: P can never complete
        assert proj.verdict(0, 0) == (DROPPED, "incomplete")
        assert proj.read_raw(s) == [encode(retry)]
        proj.apply([rec(3, event(s, 1), batch="P", i=1, n=2, writer="A")])  # too late
        assert proj.verdict(0, 3) == (DROPPED, "incomplete")
        # The age rule: a record far younger than a pending batch's first record abandons it.
        proj.apply([rec(4, event(t, 1), batch="Q", i=0, n=2, writer="C")])
        proj.apply([rec(5, event(sid(), 0), writer="D", ts=1_000 + proj.abandon_ms + 10)])
        assert proj.verdict(0, 4) == (DROPPED, "incomplete")

    def test_shared_file_applies_each_record_once(self, tmp_path: Path) -> None:
        s = sid()
        r = [rec(0, event(s, 0)), rec(1, event(s, 1))]
        p1, p2 = Projection(tmp_path / "p.db", "t"), Projection(tmp_path / "p.db", "t")
        try:
            p1.apply(r)
            p2.apply(r)  # a second process re-reads the same records
            assert len(p2.read_raw(s)) == 2 and p2.dropped() == []
        finally:
            p1.close()
            p2.close()

    def test_partitioner_is_kafkas_murmur2(self) -> None:
        # Reference values from the Java client's Utils.murmur2 (DefaultPartitionerTest).
        assert murmur2(b"21") == (-973932308) & 0xFFFFFFFF
        assert murmur2(b"foobar") == (-790332482) & 0xFFFFFFFF
        assert murmur2(b"a-little-bit-long-string") == (-985981536) & 0xFFFFFFFF
        assert murmur2(b"a-little-bit-longer-string") == (-1486304829) & 0xFFFFFFFF
        assert murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") == (-58897971) & 0xFFFFFFFF
        assert murmur2(b"abc") == (479470107) & 0xFFFFFFFF
        assert all(0 <= partition_for(sid(), 3) < 3 for _ in range(50))


# -- the projection appends with the SQLite log's own append --------------------------------
def sqlite_outcome(log: SQLiteLog, sid_: str, batch: list) -> str:
    try:
        log.append(sid_, batch, batch[0].seq)
    except DuplicateEvent:
        return "duplicate"
    except ConcurrencyError:
        return "conflict"
    except ValueError:
        return "malformed"
    return ACCEPTED


class TestProjectionIsAnSQLiteLog:
    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(["s-a", "s-b"]), st.integers(-1, 1),
                              st.lists(st.sampled_from([f"e{i}" for i in range(8)]), min_size=1, max_size=3)),
                    min_size=1, max_size=12))
    def test_every_batch_is_decided_as_sqlite_append_decides_it(self, ops) -> None:
        """Any sequence of batches (stale, ahead, reused ids, ids repeated inside a batch):
        each is accepted or refused by the projection exactly as SQLiteLog.append treats it."""
        log, proj = SQLiteLog(":memory:"), Projection(None, "t")
        try:
            off = 0
            for k, (s, delta, ids) in enumerate(ops):
                first = max(0, log.next_seq(s) + delta)
                batch = [event(s, first + i, event_id=eid) for i, eid in enumerate(ids)]
                expected = sqlite_outcome(log, s, batch)
                proj.apply([rec(off + i, e, batch=f"b{k}", i=i, n=len(batch), writer=f"w{k}")
                            for i, e in enumerate(batch)])
                verdicts = {proj.verdict(0, off + i) for i in range(len(batch))}
                off += len(batch)
                assert verdicts == ({(ACCEPTED, None)} if expected == ACCEPTED else {(DROPPED, expected)}), (k, ops)
            for s in ("s-a", "s-b"):
                assert proj.read_raw(s) == log.read_raw(s)
            assert sorted((i.session_id, i.next_seq, i.last_type) for i in proj.sessions()) == \
                   sorted((i.session_id, i.next_seq, i.last_type) for i in log.sessions())
        finally:
            log.close()
            proj.close()

    def test_a_projection_file_opens_as_an_sqlite_log(self, tmp_path: Path) -> None:
        s = sid()
        batch = events(s, 0, 3)
        proj = Projection(tmp_path / "p.db", "t")
        proj.apply([rec(i, e, batch="B", i=i, n=3) for i, e in enumerate(batch)])
        proj.close()
        with SQLiteLog(tmp_path / "p.db") as log:
            assert log.read_raw(s) == [encode(e) for e in batch]
            assert [(i.session_id, i.next_seq, i.last_type) for i in log.sessions()] == [(s, 3, "GoalReceived")]
            with pytest.raises(DuplicateEvent):
                log.check(s, [batch[0]], 3)

    def test_an_sqlite_log_is_never_taken_for_a_projection(self, tmp_path: Path) -> None:
        s = sid()
        with SQLiteLog(tmp_path / "log.db") as log:
            log.append(s, [event(s, 0)], 0)
        with pytest.raises(LogError, match="holds a log, not a projection"):
            Projection(tmp_path / "log.db", "t")
        with SQLiteLog(tmp_path / "log.db") as log:
            assert log.next_seq(s) == 1  # untouched

    def test_a_projection_of_the_older_layout_is_rebuilt(self, tmp_path: Path) -> None:
        import sqlite3

        path = tmp_path / "old.db"
        conn = sqlite3.connect(path)  # the layout before the projection used SQLiteLog's tables
        conn.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);"
                           "INSERT INTO meta VALUES ('topic', 't');"
                           "CREATE TABLE events (session_id TEXT, seq INTEGER, event_id TEXT, type TEXT, time_ms INTEGER,"
                           " data BLOB, part INTEGER, off INTEGER, ts_ms INTEGER, PRIMARY KEY (session_id, seq));"
                           "CREATE TABLE positions (part INTEGER PRIMARY KEY, next_off INTEGER);"
                           "INSERT INTO positions VALUES (0, 7);")
        conn.close()
        proj = Projection(path, "t")
        try:
            assert proj.positions() == {}  # read again from the topic's start
            s = sid()
            proj.apply([rec(0, event(s, 0))])
            assert proj.next_seq(s) == 1
        finally:
            proj.close()
