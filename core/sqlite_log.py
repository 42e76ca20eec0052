"""The embedded default log: one SQLite file (WAL), many sessions, safe with many processes.

Tables: `events` (the log; `gpos` is the global position subscriptions follow),
`sessions` (next seq per session: the optimistic-concurrency check), `offsets`
(durable positions of named subscriber groups), `links` (a fork by reference: the child's
seqs 0..parent_seq are its parent's events, read from the parent, never copied; see
`append_linked`) and `inherited` (a child's prefix materialised before its parent was deleted).
A trigger refuses to delete an event a child refers to (`delete_session` materialises first). Writes take SQLite's write lock with
BEGIN IMMEDIATE, so the seq check and the insert are one atomic step across processes.

`SQLiteLog(path, readonly=True)` is for commands that only read: it never creates a
file, a directory or a table, takes no write lock (so it answers while another process
holds the write lock), and works on read-only media: it opens the file with SQLite's
`mode=ro`, and only when that fails and nothing can write the file (a read-only file
system or file) with `immutable=1`, which tells SQLite the file cannot change.
A writable log that cannot be written fails at once with `LogUnavailable` naming why.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

from loopstream.core.codec import decode, decode_session, encode
from loopstream.core.events import Event, now_ms
from loopstream.core.log import (
    ConcurrencyError,
    Delivery,
    DuplicateEvent,
    LogError,
    SessionInfo,
    SessionNotFound,
    check_batch,
)

_TABLES = ("events", "sessions", "offsets", "links", "inherited")
_MAX_LINK_DEPTH = 100_000  # a chain of forks longer than this is a damaged log (a cycle)


class LogUnavailable(LogError):
    """The log file cannot be opened as asked (not a loopstream log, or not writable)."""


class LogNotFound(LogUnavailable):
    """A read-only open of a file that does not exist (nothing is created)."""


def unwritable(path: Path) -> str | None:
    """Why `path` (an existing file) cannot be written, or None if it can."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    if not os.access(path, os.W_OK):
        return "read-only file"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"read-only directory {path.parent}"
    return None


def _connect(target: str, busy_timeout_ms: int, uri: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000,
                           uri=uri)
    conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
    return conn


def _open_readonly(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    if not path.is_file():
        raise LogNotFound(f"no log at {path}" + (" (it is a directory)" if path.is_dir() else ""))
    uri = path.resolve().as_uri()
    try:
        conn = _connect(uri + "?mode=ro", busy_timeout_ms, uri=True)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        if unwritable(path) is None or "not a database" in str(exc):
            raise LogUnavailable(f"cannot read the log at {path}: {exc}") from None
        # WAL needs a writable -shm beside the file; nothing can change a file that
        # cannot be written, so reading it as immutable is exact.
        conn = _connect(uri + "?mode=ro&immutable=1", busy_timeout_ms, uri=True)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as exc2:
            raise LogUnavailable(f"cannot read the log at {path}: {exc2}") from None
    if not {"events", "sessions"} <= tables:
        conn.close()
        raise LogUnavailable(f"{path} is not a loopstream log (no events table)")
    return conn


# How hard a commit is pushed to the disk (docs/performance.md#durability): the WAL's
# `synchronous` setting per choice. Both keep every committed event when the writing process
# dies (kill -9, a crash: tests/test_durability.py); they differ when the machine does.
DURABILITY = {
    # A commit is written to the WAL file (the OS has it), not flushed to the disk: an OS
    # crash or a power loss may lose the last commits, never corrupt the log.
    "normal": "NORMAL",
    # Every commit is flushed to the disk (fsync of the WAL) before append returns: an OS
    # crash or a power loss loses nothing append returned for (if the disk honours fsync).
    "full": "FULL",
}
DEFAULT_DURABILITY = "normal"


def durability_setting(value: str | None) -> str:
    """`value` checked ("normal" or "full", any case; None: the default), or ValueError in one line."""
    choice = (value or DEFAULT_DURABILITY).strip().lower()
    if choice not in DURABILITY:
        raise ValueError(f"durability must be one of {', '.join(DURABILITY)}, not {value!r}")
    return choice


class SQLiteLog:
    """The `Log` over one SQLite file (`":memory:"`: a private in-memory database).
    `durability` ("normal", the default, or "full"): see DURABILITY."""

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 30_000, readonly: bool = False,
                 durability: str | None = None) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.durability = durability_setting(durability)
        self._lock = threading.RLock()
        if readonly:
            self.db = sqlite_utils.Database(_open_readonly(self.path, busy_timeout_ms))
            self._linked = "links" in self.db.table_names()  # a log written before forks by reference: none
            return
        if self.path.exists() and (why := unwritable(self.path)):
            raise LogUnavailable(f"the log at {self.path} cannot be written ({why})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(str(self.path), busy_timeout_ms)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {DURABILITY[self.durability]}")
            self.db = sqlite_utils.Database(conn)
            self._create()
            self._linked = True
        except sqlite3.Error as exc:
            conn.close()
            raise LogUnavailable(f"cannot open the log at {self.path}: {exc}") from None

    def _create(self) -> None:
        if set(_TABLES) <= set(self.db.table_names()):
            return  # nothing to create: no need to wait for the write lock
        with self.transaction():
            if "events" not in self.db.table_names():
                self.db["events"].create(
                    {"gpos": int, "session_id": str, "seq": int, "event_id": str,
                     "type": str, "time_ms": int, "data": bytes},
                    pk="gpos",
                )
                self.db["events"].create_index(["session_id", "seq"], unique=True)
                self.db["events"].create_index(["event_id"], unique=True)
            if "sessions" not in self.db.table_names():
                self.db["sessions"].create(
                    {"session_id": str, "created_ms": int, "updated_ms": int,
                     "next_seq": int, "last_type": str},
                    pk="session_id",
                )
            if "offsets" not in self.db.table_names():
                self.db["offsets"].create({"group_name": str, "gpos": int}, pk="group_name")
            conn = self.db.conn
            conn.execute("CREATE TABLE IF NOT EXISTS links (session_id TEXT PRIMARY KEY, "
                         "parent_session_id TEXT, parent_seq INTEGER NOT NULL)")  # parent NULL: materialised
            conn.execute("CREATE INDEX IF NOT EXISTS links_parent ON links (parent_session_id, parent_seq)")
            conn.execute("CREATE TABLE IF NOT EXISTS inherited (session_id TEXT NOT NULL, seq INTEGER NOT NULL, "
                         "type TEXT, data BLOB, PRIMARY KEY (session_id, seq))")
            conn.execute(
                "CREATE TRIGGER IF NOT EXISTS events_referred BEFORE DELETE ON events WHEN EXISTS "
                "(SELECT 1 FROM links WHERE parent_session_id = OLD.session_id AND parent_seq >= OLD.seq) "
                "BEGIN SELECT RAISE(ABORT, 'a forked session refers to this event (materialise it first)'); END")

    # -- writing -----------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE takes SQLite's write lock (across
        processes), COMMIT at the end of the block, ROLLBACK if it raises."""
        conn = self.db.conn
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                _rollback(conn)
                raise
            conn.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query in the block sees the same state."""
        conn = self.db.conn
        with self._lock:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def append(self, session_id: str, events: Sequence[Event], expected_seq: int) -> None:
        check_batch(session_id, events, expected_seq)
        try:
            with self.transaction():
                self.insert(session_id, events, expected_seq)
        except sqlite3.Error as exc:  # read-only, full disk, locked for longer than the busy timeout
            raise LogUnavailable(f"cannot write the log at {self.path}: {exc}") from None

    def check(self, session_id: str, events: Sequence[Event], expected_seq: int) -> None:
        """Raise what `append` would raise for this batch now (DuplicateEvent first, then
        ConcurrencyError), write nothing."""
        with self._lock:
            self._check(session_id, [e.event_id for e in events], expected_seq)

    def append_linked(self, session_id: str, parent_session_id: str, parent_seq: int,
                      events: Sequence[Event]) -> None:
        """Start `session_id` as a fork by reference: its seqs 0..parent_seq are the parent's
        events (read from the parent, never copied), then `events` (seqs parent_seq + 1, …),
        in one transaction. The session must not exist (ConcurrencyError; DuplicateEvent if an
        event id is stored) and the parent must have the seq (SessionNotFound / LogError)."""
        check_batch(session_id, events, parent_seq + 1)
        try:
            with self.transaction() as conn:
                self._check(session_id, [e.event_id for e in events], 0)
                have = self._next_seq(parent_session_id)
                if have == 0:
                    raise SessionNotFound(parent_session_id)
                if not 0 <= parent_seq < have:
                    raise LogError(f"session {parent_session_id} has seqs 0..{have - 1}, not {parent_seq}")
                conn.execute("INSERT INTO links (session_id, parent_session_id, parent_seq) VALUES (?, ?, ?)",
                             (session_id, parent_session_id, parent_seq))
                t = now_ms()
                conn.execute("INSERT INTO sessions (session_id, created_ms, updated_ms, next_seq, last_type) "
                             "VALUES (?, ?, ?, ?, ?)", (session_id, t, t, parent_seq + 1, ""))
                self.insert(session_id, events, parent_seq + 1, at_ms=t)
        except sqlite3.Error as exc:
            raise LogUnavailable(f"cannot write the log at {self.path}: {exc}") from None

    def materialise(self, session_id: str) -> int:
        """Store a fork's inherited prefix as its own (the same bytes, in `inherited`) and drop
        its reference to the parent; the number of events stored (0: nothing referred)."""
        with self.transaction() as conn:
            return self._materialise(conn, session_id)

    def _materialise(self, conn: sqlite3.Connection, session_id: str) -> int:
        link = self._link(session_id)
        if link is None or link[0] is None:
            return 0
        rows = self._rows(session_id, 0, link[1], "type, data")
        conn.executemany("INSERT OR REPLACE INTO inherited (session_id, seq, type, data) VALUES (?, ?, ?, ?)",
                         [(session_id, i, t, d) for i, (t, d) in enumerate(rows)])
        conn.execute("UPDATE links SET parent_session_id = NULL WHERE session_id = ?", (session_id,))
        return len(rows)

    def delete_session(self, session_id: str) -> int:
        """Delete a session's events (its forks by reference keep their history: their prefix
        is materialised first, in the same transaction); the number of events deleted."""
        with self.transaction() as conn:
            children = [r[0] for r in conn.execute(
                "SELECT session_id FROM links WHERE parent_session_id = ?", (session_id,))]
            for child in children:
                self._materialise(conn, child)
            n = conn.execute("DELETE FROM events WHERE session_id = ?", (session_id,)).rowcount
            for table in ("sessions", "links", "inherited"):
                conn.execute(f"DELETE FROM {table} WHERE session_id = ?", (session_id,))
            return n

    def insert(self, session_id: str, events: Sequence[Event], expected_seq: int, *,
               data: Sequence[bytes] | None = None, at_ms: int | None = None) -> None:
        """The body of `append`, inside the caller's `transaction()`: the checks of `check`,
        then the rows; nothing is written when it raises. `data`: the events' stored bytes if
        the caller has them (default: `encode` each); `at_ms`: the session's update time
        (default: now). The Kafka projection appends what its acceptance rule accepts with it."""
        conn = self.db.conn
        if not conn.in_transaction:
            raise LogError("SQLiteLog.insert runs inside SQLiteLog.transaction()")
        if self._next_seq(session_id) != expected_seq:  # the rare path: say which conflict it is
            self._check(session_id, [e.event_id for e in events], expected_seq)
        stored = data if data is not None else [encode(e) for e in events]
        # A duplicate id is found by the unique index on event_id, not by a SELECT before
        # every insert. The rows of the batch that went in before it are taken back (the
        # session's next seq was checked above: every row from it on is this batch's), so
        # a caller that goes on with the transaction (the Kafka projection) keeps none.
        try:
            conn.executemany(
                "INSERT INTO events (session_id, seq, event_id, type, time_ms, data) VALUES (?, ?, ?, ?, ?, ?)",
                [(e.session_id, e.seq, e.event_id, e.type, e.time, d) for e, d in zip(events, stored, strict=True)],
            )
        except sqlite3.IntegrityError:
            conn.execute("DELETE FROM events WHERE session_id = ? AND seq >= ?", (session_id, expected_seq))
            self._check(session_id, [e.event_id for e in events], expected_seq)
            raise
        t = now_ms() if at_ms is None else at_ms
        conn.execute(
            "INSERT INTO sessions (session_id, created_ms, updated_ms, next_seq, last_type) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(session_id) DO UPDATE SET "
            "updated_ms = excluded.updated_ms, next_seq = excluded.next_seq, "
            "last_type = excluded.last_type",
            (session_id, t, t, expected_seq + len(events), events[-1].type),
        )

    def _check(self, session_id: str, ids: Sequence[str], expected_seq: int) -> None:
        actual = self._next_seq(session_id)
        dup = self.db.conn.execute(
            f"SELECT event_id FROM events WHERE event_id IN ({','.join('?' * len(ids))}) LIMIT 1", list(ids),
        ).fetchone()
        if dup:  # any id of the batch, not only the first: the batch stays atomic
            raise DuplicateEvent(session_id, dup[0], expected_seq, actual)
        if actual != expected_seq:
            raise ConcurrencyError(session_id, expected_seq, actual)

    # -- reading -----------------------------------------------------------------
    def _next_seq(self, session_id: str) -> int:
        row = self.db.conn.execute(
            "SELECT next_seq FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        return row[0] if row else 0

    def next_seq(self, session_id: str) -> int:
        with self._lock:
            return self._next_seq(session_id)

    def read_raw(self, session_id: str, from_seq: int = 0, to_seq: int | None = None) -> list[bytes]:
        # a NULL blob reads as no bytes: an unreadable event, named by its seq
        return [r[0] or b"" for r in self._rows(session_id, from_seq, to_seq, "data")]

    def read_raw_of_types(self, session_id: str, types: Sequence[str], from_seq: int = 0,
                          to_seq: int | None = None) -> list[tuple[int, bytes]]:
        """(seq, stored bytes) of the session's events of these types only, in seq order."""
        marks = ",".join("?" * len(types))
        return [(r[0], r[1] or b"") for r in self._rows(session_id, from_seq, to_seq, "seq, data",
                                                          f" AND type IN ({marks})", tuple(types))]

    def _rows(self, session_id: str, from_seq: int, to_seq: int | None, columns: str, where: str = "",
              args: tuple = ()) -> list[tuple]:
        hi = to_seq if to_seq is not None else 2**62
        with self._lock:
            parts = [self.db.conn.execute(
                f"SELECT {columns} FROM {table} WHERE session_id = ? AND seq >= ? AND seq <= ?{where} ORDER BY seq",
                (sid, lo, top, *args),
            ).fetchall() for table, sid, lo, top in self._sources(session_id, from_seq, hi)]
        return [r for rows in reversed(parts) for r in rows]

    def _sources(self, session_id: str, lo: int, hi: int) -> list[tuple[str, str, int, int]]:
        """Where seqs lo..hi of a session are stored, last part first: (table, session, lo, hi).
        A fork by reference reads its prefix from its parent (itself perhaps a fork)."""
        out: list[tuple[str, str, int, int]] = []
        for _ in range(_MAX_LINK_DEPTH):
            link = self._link(session_id) if lo <= hi else None
            if link is None:
                out.append(("events", session_id, lo, hi))
                return out
            parent, upto = link
            if hi > upto:
                out.append(("events", session_id, max(lo, upto + 1), hi))
            if parent is None:  # materialised: the prefix is the child's own copy of the bytes
                out.append(("inherited", session_id, lo, min(hi, upto)))
                return out
            session_id, hi = parent, min(hi, upto)
        raise LogError(f"session {session_id}: its chain of forks does not end (a damaged log)")

    def _link(self, session_id: str) -> tuple[str | None, int] | None:
        if not self._linked:
            return None
        row = self.db.conn.execute(
            "SELECT parent_session_id, parent_seq FROM links WHERE session_id = ?", (session_id,)
        ).fetchone()
        return (row[0], row[1]) if row else None

    def parent_of(self, session_id: str) -> tuple[str | None, int] | None:
        """(parent session, last inherited seq) of a fork by reference (parent None: its prefix
        is materialised), or None for a session that owns all its events."""
        with self._lock:
            return self._link(session_id)

    def read(self, session_id: str, from_seq: int = 0, to_seq: int | None = None) -> list[Event]:
        return decode_session(self.read_raw(session_id, from_seq, to_seq), session_id, from_seq)

    def sessions(self) -> list[SessionInfo]:
        with self._lock:
            rows = self.db.conn.execute(
                "SELECT session_id, created_ms, updated_ms, next_seq, last_type FROM sessions "
                "ORDER BY created_ms, session_id"
            ).fetchall()
        return [SessionInfo(*r) for r in rows]

    def find_session(self, prefix: str) -> list[str]:
        """Session ids starting with `prefix` (so users can type a short id). Every character
        of the prefix is literal (`_` and `%` too); ASCII letters match either case."""
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        with self._lock:
            rows = self.db.conn.execute(
                "SELECT session_id FROM sessions WHERE session_id LIKE ? ESCAPE '\\' ORDER BY session_id",
                (escaped + "%",),
            ).fetchall()
        return [r[0] for r in rows]

    # -- subscribing -------------------------------------------------------------
    def subscribe(self, group: str) -> SQLiteSubscription:
        return SQLiteSubscription(self, group)

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    def __enter__(self) -> SQLiteLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


class SQLiteSubscription:
    """A named group's cursor over the global order of events, stored in `offsets`."""

    def __init__(self, log: SQLiteLog, group: str) -> None:
        self.log, self.group = log, group
        with log._lock:
            row = log.db.conn.execute(
                "SELECT gpos FROM offsets WHERE group_name = ?", (group,)
            ).fetchone()
        self._cursor = row[0] if row else 0  # next poll reads after this position

    def poll(self, max_events: int = 100, timeout: float = 1.0) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while True:
            with self.log._lock:
                rows = self.log.db.conn.execute(
                    "SELECT gpos, data FROM events WHERE gpos > ? ORDER BY gpos LIMIT ?",
                    (self._cursor, max_events),
                ).fetchall()
            if rows:
                self._cursor = rows[-1][0]
                return [Delivery(decode(data), gpos) for gpos, data in rows]
            if time.monotonic() >= deadline:
                return []
            time.sleep(0.02)

    def commit(self, delivery: Delivery) -> None:
        with self.log._lock:
            self.log.db.conn.execute(
                "INSERT INTO offsets (group_name, gpos) VALUES (?, ?) ON CONFLICT(group_name) "
                "DO UPDATE SET gpos = max(gpos, excluded.gpos)",
                (self.group, delivery.position),
            )

    def close(self) -> None:
        pass
