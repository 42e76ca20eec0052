"""The local projection of the events topic: the records the acceptance rule accepts,
appended to a `SQLiteLog` with its own append (same tables, same checks), plus the rule's
bookkeeping. Records in, verdicts out; no Kafka client here. The rule: docs/kafka.md."""
from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopstream.core.codec import CodecError, decode
from loopstream.core.events import Event
from loopstream.core.log import ConcurrencyError, DuplicateEvent, LogError, SessionInfo, check_batch
from loopstream.core.sqlite_log import SQLiteLog

H_TYPE, H_BATCH, H_INDEX, H_SIZE, H_WRITER = "ls.type", "ls.batch", "ls.i", "ls.n", "ls.writer"
ACCEPTED, DROPPED, PENDING = "accepted", "dropped", "pending"
LAYOUT = "2"  # 2: the accepted events live in SQLiteLog's tables


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


Row = tuple[int, int, int, bytes]  # partition, offset, timestamp, value


class Projection:
    """Per-session view of the topic. `store` is a SQLiteLog holding the accepted events
    (read it like any log); the tables beside it say where each record went:
    `accepted` and `dropped` by (partition, offset), `pending` batches, and `positions`
    (the next offset per partition). Several processes may share one file: each `apply`
    is one write transaction and skips records below the stored position."""

    def __init__(self, path: str | Path | None, topic: str, *, abandon_ms: int = 120_000) -> None:
        self.topic, self.abandon_ms = topic, abandon_ms
        if path is not None:
            _prepare_file(Path(path), topic)
        self.store = SQLiteLog(":memory:" if path is None else path)
        self._create()

    def _create(self) -> None:
        db = self.store.db
        with self.store.transaction() as c:
            tables = set(db.table_names())
            if "meta" not in tables:
                db["meta"].create({"key": str, "value": str}, pk="key")
                c.executemany("INSERT INTO meta VALUES (?, ?)", [("topic", self.topic), ("layout", LAYOUT)])
            if "accepted" not in tables:
                db["accepted"].create({"part": int, "off": int, "event_id": str}, pk=("part", "off"))
            if "positions" not in tables:
                db["positions"].create({"part": int, "next_off": int}, pk="part")
            if "batches" not in tables:  # multi-record batches: pending until complete, then decided
                db["batches"].create({"batch_id": str, "part": int, "writer": str, "first_ts": int, "n": int,
                                      "state": str}, pk="batch_id")
                db["batches"].create_index(["part", "state"])
            if "pending" not in tables:
                db["pending"].create({"batch_id": str, "i": int, "part": int, "off": int, "ts_ms": int,
                                      "data": bytes}, pk=("batch_id", "i"))
                db["pending"].create_index(["part", "off"])
            if "dropped" not in tables:
                db["dropped"].create({"part": int, "off": int, "batch_id": str, "session_id": str, "seq": int,
                                      "event_id": str, "reason": str}, pk=("part", "off"))
            (topic,) = c.execute("SELECT value FROM meta WHERE key = 'topic'").fetchone()
        if topic != self.topic:
            raise LogError(f"projection belongs to topic {topic!r}, not {self.topic!r}")

    # -- applying records ----------------------------------------------------------
    def apply(self, records: Iterable[Record]) -> None:
        with self.store.transaction() as c:
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
        row: Row = (r.partition, r.offset, r.timestamp_ms, r.value)
        if not 0 <= i < n:
            self._drop(c, batch, [row], "malformed")
            return
        if n == 1:
            self._decide(c, batch, [row])
            return
        state = c.execute("SELECT state FROM batches WHERE batch_id = ?", (batch,)).fetchone()
        if state is None:
            c.execute("INSERT INTO batches (batch_id, part, writer, first_ts, n, state) VALUES (?, ?, ?, ?, ?, ?)",
                      (batch, r.partition, writer, r.timestamp_ms, n, PENDING))
        elif state[0] != PENDING:  # a late record of a batch already decided (e.g. abandoned)
            self._drop(c, batch, [row], "incomplete")
            return
        if c.execute("SELECT 1 FROM pending WHERE batch_id = ? AND i = ?", (batch, i)).fetchone():
            self._drop(c, batch, [row], "duplicate")
            return
        c.execute("INSERT INTO pending (batch_id, i, part, off, ts_ms, data) VALUES (?, ?, ?, ?, ?, ?)",
                  (batch, i, *row))
        rows = c.execute("SELECT part, off, ts_ms, data FROM pending WHERE batch_id = ? ORDER BY i",
                         (batch,)).fetchall()
        if len(rows) == n:
            c.execute("DELETE FROM pending WHERE batch_id = ?", (batch,))
            self._decide(c, batch, rows)

    def _abandon(self, c: sqlite3.Connection, r: Record, batch: str, writer: str) -> None:
        for bid, bwriter, first_ts in c.execute(
            "SELECT batch_id, writer, first_ts FROM batches WHERE part = ? AND state = ?", (r.partition, PENDING),
        ).fetchall():
            if bid != batch and ((writer and bwriter == writer) or r.timestamp_ms > first_ts + self.abandon_ms):
                rows = c.execute("SELECT part, off, ts_ms, data FROM pending WHERE batch_id = ? ORDER BY i",
                                 (bid,)).fetchall()
                c.execute("DELETE FROM pending WHERE batch_id = ?", (bid,))
                self._drop(c, bid, rows, "incomplete")

    def _decide(self, c: sqlite3.Connection, batch: str, rows: Sequence[Row]) -> None:
        """A complete batch: appended with the SQLite log's own append, or dropped for the
        reason that append gives (a duplicate id, a seq that is not the session's next)."""
        try:
            events = [decode(data) for *_, data in rows]
            check_batch(events[0].session_id, events, events[0].seq)
        except (CodecError, ValueError):
            self._drop(c, batch, rows, "malformed")
            return
        try:
            self.store.insert(events[0].session_id, events, events[0].seq,
                              data=[data for *_, data in rows], at_ms=rows[-1][2])
        except DuplicateEvent:
            self._drop(c, batch, rows, "duplicate", events)
            return
        except ConcurrencyError:
            self._drop(c, batch, rows, "conflict", events)
            return
        c.executemany("INSERT INTO accepted (part, off, event_id) VALUES (?, ?, ?)",
                      [(p, o, e.event_id) for e, (p, o, _, _) in zip(events, rows)])
        c.execute("UPDATE batches SET state = ? WHERE batch_id = ?", (ACCEPTED, batch))

    def _drop(self, c: sqlite3.Connection, batch: str, rows: Sequence[Row], reason: str,
              events: Sequence[Event] | None = None) -> None:
        for k, (p, o, _, data) in enumerate(rows):
            e = events[k] if events else _decoded(data)
            c.execute(
                "INSERT OR IGNORE INTO dropped (part, off, batch_id, session_id, seq, event_id, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (p, o, batch, e.session_id if e else None, e.seq if e else None, e.event_id if e else None, reason),
            )
        c.execute("UPDATE batches SET state = ? WHERE batch_id = ?", (DROPPED, batch))

    # -- the topic it projects -----------------------------------------------------------
    def identity(self) -> tuple[str | None, int | None]:
        """(topic id, partition count) of the topic these records came from, as recorded."""
        with self.store.snapshot() as c:
            meta = dict(c.execute("SELECT key, value FROM meta WHERE key IN ('topic_id', 'partitions')").fetchall())
        parts = meta.get("partitions")
        return meta.get("topic_id") or None, int(parts) if parts else None

    def remember(self, topic_id: str | None, partitions: int) -> None:
        """Record the identity of the topic (first open, or after a reset)."""
        with self.store.transaction() as c:
            c.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                          [("topic_id", topic_id or ""), ("partitions", str(partitions))])

    def reset(self, topic_id: str | None, partitions: int) -> bool:
        """Empty the projection (every event, every verdict, every position) to rebuild it
        from a restored topic; False if another process sharing the file already did it
        for this topic id."""
        with self.store.transaction() as c:
            row = c.execute("SELECT value FROM meta WHERE key = 'topic_id'").fetchone()
            if topic_id and row and row[0] == topic_id:
                return False
            tables = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for t in tables:
                if t not in ("meta", "sqlite_sequence"):
                    c.execute(f'DELETE FROM "{t}"')
            c.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                          [("topic_id", topic_id or ""), ("partitions", str(partitions))])
        return True

    def is_empty(self) -> bool:
        with self.store.snapshot() as c:
            return c.execute("SELECT 1 FROM positions WHERE next_off > 0 LIMIT 1").fetchone() is None

    # -- queries ---------------------------------------------------------------------
    def positions(self) -> dict[int, int]:
        with self.store.snapshot() as c:
            return dict(c.execute("SELECT part, next_off FROM positions").fetchall())

    def verdict(self, partition: int, offset: int) -> tuple[str, str | None] | None:
        """(ACCEPTED, None), (DROPPED, reason), (PENDING, None), or None if not applied yet."""
        # One read snapshot: another process sharing the file may apply records between
        # these statements (without it, a record applied meanwhile read as "not applied").
        with self.store.snapshot() as c:
            at = (partition, offset)
            if c.execute("SELECT 1 FROM accepted WHERE part = ? AND off = ?", at).fetchone():
                return ACCEPTED, None
            row = c.execute("SELECT reason FROM dropped WHERE part = ? AND off = ?", at).fetchone()
            if row:
                return DROPPED, row[0]
            if c.execute("SELECT 1 FROM pending WHERE part = ? AND off = ?", at).fetchone():
                return PENDING, None
            row = c.execute("SELECT next_off FROM positions WHERE part = ?", (partition,)).fetchone()
            if row and offset < row[0]:
                return DROPPED, "not applied"  # below the position but never stored: cannot happen
            return None

    def accepted_ends(self) -> dict[int, int]:
        """Per partition, the offset after its last accepted record."""
        with self.store.snapshot() as c:
            return dict(c.execute("SELECT part, MAX(off) + 1 FROM accepted GROUP BY part").fetchall())

    def dropped(self) -> list[dict[str, Any]]:
        cols = ("partition", "offset", "batch_id", "session_id", "seq", "event_id", "reason")
        with self.store.snapshot() as c:
            rows = c.execute("SELECT part, off, batch_id, session_id, seq, event_id, reason FROM dropped "
                             "ORDER BY part, off").fetchall()
        return [dict(zip(cols, r)) for r in rows]

    def next_seq(self, session_id: str) -> int:
        return self.store.next_seq(session_id)

    def read_raw(self, session_id: str, from_seq: int = 0, to_seq: int | None = None) -> list[bytes]:
        return self.store.read_raw(session_id, from_seq, to_seq)

    def sessions(self) -> list[SessionInfo]:
        return self.store.sessions()

    def find_session(self, prefix: str) -> list[str]:
        return self.store.find_session(prefix)

    def close(self) -> None:
        self.store.close()


def _decoded(data: bytes) -> Event | None:
    try:
        return decode(data)
    except CodecError:
        return None


def _prepare_file(path: Path, topic: str) -> None:
    """Refuse a file that is not a projection (an SQLite log given as --db); empty one of
    an older layout (a projection is rebuilt from the topic)."""
    if not path.exists():
        return
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=30)
    except sqlite3.Error as exc:
        raise LogError(f"cannot open the projection {path}: {exc}") from None
    try:
        conn.execute("BEGIN IMMEDIATE")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else None
        if meta is None and "events" in tables:
            raise LogError(f"{path} holds a log, not a projection of {topic}: give the Kafka bus another --db")
        if meta is not None and meta.get("layout") != LAYOUT:
            for t in tables - {"sqlite_sequence"}:
                conn.execute(f'DROP TABLE "{t}"')
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise LogError(f"cannot open the projection {path}: {exc}") from None
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()
