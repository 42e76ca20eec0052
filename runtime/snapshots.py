"""Snapshots of the folded state: a projection of the log, so a session's state at any
length is read, not folded from its first event (docs/performance.md#snapshots).

A row of `snapshots` (in the log's SQLite file) holds the state after event `seq`: its
fields but the conversation, and the messages added since the row it builds on (`base`:
the session's previous row, or its parent's for a fork by reference) — the conversation
only grows by appending until compaction or a fork's prompt rewrites it
(`SessionState.rewrites`), and then the row holds all of it. So the rows of a session
take storage linear in its length. Rows are written every `STRIDE` events by the writer
and by `latest`, never inside an append: a crash loses at most a row, which is rebuilt.

Every row carries `VERSION`, a hash of the fold's code and of the state's fields: when the
fold changes, old rows are ignored (and replaced as sessions are read again). A row is
used only if its chain hash is the stored event's at its seq (the log it was taken from),
and it is read with an unpickler that builds nothing but the state's own types.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import pickle
import sqlite3
import sys
from collections.abc import Sequence

import pydantic

from loopstream.core import conversation, events, fsm, policy, sampling, state
from loopstream.core.codec import chain_link
from loopstream.core.conversation import MessageList
from loopstream.core.log import Log, LogError, SessionNotFound
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import SessionState, fold

STRIDE = 128  # a row every STRIDE events: the fold past the last row is at most this long
_FIELDS = tuple(f.name for f in dataclasses.fields(SessionState) if f.name != "messages")
_FIELD_SET = frozenset(_FIELDS)


def _version() -> str:
    """A hash of what the fold's result depends on: its modules' code and the state's fields."""
    h = hashlib.sha256(repr((_FIELDS, pydantic.VERSION, sys.version_info[:2])).encode())
    for module in (state, conversation, events, fsm, policy, sampling):
        with open(module.__file__ or "", "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:32]


VERSION = _version()

_TABLE = ("CREATE TABLE IF NOT EXISTS snapshots (session_id TEXT NOT NULL, seq INTEGER NOT NULL, "
          "version TEXT NOT NULL, base_session TEXT, base_seq INTEGER, n_messages INTEGER NOT NULL, "
          "rewrites INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (session_id, seq))")

# The only globals a row may name: the state's own types and plain containers.
_ALLOWED = {
    ("builtins", n) for n in ("set", "frozenset", "tuple", "list", "dict", "bytes", "bytearray", "complex")
} | {("copyreg", "_reconstructor"), ("builtins", "object")}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module.startswith("loopstream.core."):
            found = super().find_class(module, name)
            if isinstance(found, type) and (issubclass(found, pydantic.BaseModel) or dataclasses.is_dataclass(found)
                                            or found.__module__ == module):
                return found
        raise pickle.UnpicklingError(f"a snapshot may not name {module}.{name}")


class Snapshots:
    """The snapshot rows of one SQLite log (`for_log`: None for a log without a SQLite file)."""

    def __init__(self, log: SQLiteLog) -> None:
        self.log = log
        self.writable = not log.readonly
        self._ready = False
        self.folded = 0  # events the last `state_at` folded past its row
        self.base: SessionState | None = None  # the row the last `state_at` started from

    @classmethod
    def for_log(cls, log: Log) -> Snapshots | None:
        return cls(log) if isinstance(log, SQLiteLog) else None

    def _table(self, create: bool = False) -> bool:
        """Whether the table is there; `create` (a write: only `save` asks) makes it. A read
        never takes the write lock (a reader must not wait for, or delay, a writer)."""
        if not self._ready:
            with self.log._lock:
                have = self.log.db.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'snapshots'").fetchone()
            if not have and create and self.writable:
                with self.log.transaction() as conn:
                    conn.execute(_TABLE)
                have = True
            self._ready = bool(have)
        return self._ready

    # -- reading ----------------------------------------------------------------------
    def state_at(self, session_id: str, seq: int | None = None) -> SessionState:
        """The session folded to `seq` (None: its head) from the nearest good row at or
        before it; SessionNotFound if it has no events."""
        head = self.log.next_seq(session_id) - 1
        if head < 0:
            raise SessionNotFound(session_id)
        seq = head if seq is None else min(seq, head)
        base = self.base = self._nearest(session_id, seq)
        rest = self.log.read(session_id, base.seq + 1, seq) if base is not None else self.log.read(session_id, 0, seq)
        self.folded = len(rest)
        return fold(rest, base) if base is not None else fold(rest)

    def _nearest(self, session_id: str, seq: int) -> SessionState | None:
        found = self._nearest_row(session_id, seq)
        if found is None:
            return None
        got = self._load(*found)
        return got if got is not None and self._matches(session_id, got) else None

    def _nearest_row(self, session_id: str, seq: int) -> tuple[str, int] | None:
        """(session, seq) of the latest row at or before `seq`: the session's, else its parent's
        (a fork by reference) at or before the seq it inherits up to."""
        if not self._table():
            return None
        sid, top = session_id, seq
        for _ in range(1000):
            with self.log._lock:
                row = self.log.db.conn.execute(
                    "SELECT seq FROM snapshots WHERE session_id = ? AND seq <= ? AND version = ? "
                    "ORDER BY seq DESC LIMIT 1", (sid, top, VERSION)).fetchone()
            if row is not None:
                return sid, row[0]
            link = self.log.parent_of(sid)
            if link is None or link[0] is None:
                return None
            sid, top = link[0], min(top, link[1])
        return None

    def fields_at(self, session_id: str, seq: int | None = None) -> dict | None:
        """The state's fields but its messages (cheap: no conversation) at the latest good row
        at or before `seq` (None: any), or None if there is none."""
        found = self._nearest_row(session_id, 2**62 if seq is None else seq)
        if found is None:
            return None
        with self.log._lock:
            row = self.log.db.conn.execute("SELECT data FROM snapshots WHERE session_id = ? AND seq = ?",
                                           found).fetchone()
        try:
            fields = _Unpickler(io.BytesIO(_Unpickler(io.BytesIO(row[0])).load()[0])).load()
            probe = SessionState(seq=fields["seq"], chain_head=fields["chain_head"])
        except Exception:  # noqa: BLE001 - a damaged row: none
            return None
        return fields if self._matches(session_id, probe) else None

    def _load(self, session_id: str, seq: int) -> SessionState | None:
        """The state of one row, its messages gathered along its bases; None if unreadable.
        The cyclic GC is paused meanwhile: thousands of new tuples would set it off several
        times over objects that hold no cycles (it cost more than the reading)."""
        was = gc.isenabled()
        gc.disable()
        try:
            return self._load_rows(session_id, seq)
        finally:
            if was:
                gc.enable()

    def _load_rows(self, session_id: str, seq: int) -> SessionState | None:
        chunks: list[list[tuple]] = []
        fields: bytes | None = None
        sid: str | None = session_id
        at = seq
        try:
            while sid is not None:
                with self.log._lock:  # the session's rows up to `at` in one query: most bases are among them
                    rows = {r[0]: r[1:] for r in self.log.db.conn.execute(
                        "SELECT seq, base_session, base_seq, version, data FROM snapshots WHERE session_id = ? "
                        "AND seq <= ?", (sid, at))}
                here = sid
                while sid == here:
                    row = rows.get(at)
                    if row is None or row[2] != VERSION or len(chunks) > 100_000:
                        return None
                    got_fields, messages = _Unpickler(io.BytesIO(row[3])).load()
                    fields = got_fields if fields is None else fields
                    chunks.append(messages)
                    sid, at = row[0], row[1]
            out = object.__new__(SessionState)
            for name, value in _Unpickler(io.BytesIO(fields)).load().items():  # type: ignore[arg-type]
                if name in _FIELD_SET:
                    setattr(out, name, value)
            out.messages = MessageList.from_rows([m for chunk in reversed(chunks) for m in chunk])
            return out
        except Exception:  # noqa: BLE001 - a damaged or foreign row is ignored: the events decide
            return None

    def _matches(self, session_id: str, snap: SessionState) -> bool:
        """The row was taken from this log: its chain hash is the stored event's at its seq."""
        raw = self.log.read_raw(session_id, snap.seq, snap.seq)
        if not raw:
            return False
        if snap.chain_head is None:
            return len(raw[0]) < 33 or raw[0][-33] != 2
        return raw[0][-32:] == snap.chain_head

    # -- writing ----------------------------------------------------------------------
    def save(self, s: SessionState) -> None:
        """Store a row for `s` (the state after its event `s.seq`, of session `s.session_id`,
        or of a fork by reference folded that far), if the stored events' chain is intact
        from the row before it (or from the first event) to `s`: a row also vouches for
        the chain up to it (`fork` verifies only from the nearest row). Nothing if the log
        cannot be written or the chain is broken."""
        if not self.writable or s.seq < 0 or not self._table(create=True):
            return
        sid = s.session_id
        try:
            with self.log._lock:
                prev = self.log.db.conn.execute(
                    "SELECT session_id, seq, n_messages, rewrites, data FROM snapshots WHERE session_id = ? "
                    "AND seq < ? AND version = ? ORDER BY seq DESC LIMIT 1", (sid, s.seq, VERSION)).fetchone()
                if prev is None:  # a fork by reference builds on its parent's rows
                    prev = self._parent_row(sid, s.seq)
            if not self._chain_ok(sid, s, prev):
                return
            messages = s.messages if isinstance(s.messages, MessageList) else MessageList(s.messages)
            base: tuple[str | None, int | None] = (None, None)
            start = 0
            if prev is not None and prev[3] == s.rewrites and prev[2] <= len(messages):
                base, start = (prev[0], prev[1]), prev[2]
            fields = pickle.dumps({n: getattr(s, n) for n in _FIELDS}, protocol=5)
            data = pickle.dumps((fields, messages.rows(start)), protocol=5)
            with self.log.transaction() as conn:
                conn.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (sid, s.seq, VERSION, base[0], base[1], len(s.messages), s.rewrites, data))
        except (sqlite3.Error, LogError, pickle.PicklingError):
            return  # a projection: the events are the truth, the row is rebuilt later

    def _chain_ok(self, session_id: str, s: SessionState, prev: tuple | None) -> bool:
        """The stored events after the row `prev` (or from seq 0) up to `s.seq` link into a chain
        that ends at `s.chain_head`."""
        if s.chain_head is None:
            return True  # a session from before chaining: nothing to verify
        start, head = 0, None
        if prev is not None:
            fields = _Unpickler(io.BytesIO(_Unpickler(io.BytesIO(prev[4])).load()[0])).load()
            start, head = prev[1] + 1, fields.get("chain_head")
            if head is None:
                return False
        return chain_intact(self.log.read_raw(session_id, start, s.seq), head) == s.chain_head

    def _parent_row(self, session_id: str, seq: int) -> tuple | None:
        link = self.log.parent_of(session_id)
        if link is None or link[0] is None:
            return None
        return self.log.db.conn.execute(
            "SELECT session_id, seq, n_messages, rewrites, data FROM snapshots WHERE session_id = ? AND seq <= ? "
            "AND version = ? ORDER BY seq DESC LIMIT 1", (link[0], min(seq, link[1]), VERSION)).fetchone()

    def latest(self, session_id: str) -> SessionState:
        """The session at its head (`state_at`), storing a row if the fold past the last was long."""
        s = self.state_at(session_id)
        if self.folded >= STRIDE:
            self.save(s)
        return s

    def note(self, s: SessionState, since: int) -> None:
        """After an append took the session from seq `since` to `s`: save a row if it crossed
        a STRIDE boundary or ended the session."""
        if s.seq // STRIDE > since // STRIDE or (s.terminal and since >= STRIDE):
            self.save(s)


def chain_intact(raw: Sequence[bytes], prev: bytes | None) -> bytes | None:
    """The chain hash after the chained events `raw` whose predecessor's hash is `prev` (None:
    they start at seq 0), or None if a link is broken (`replay.chain` says where and why)."""
    h = prev
    for data in raw:
        if len(data) <= 33 or data[-33] != 2:
            return None
        h = chain_link(h, data[:-33])
        if h != data[-32:]:
            return None
    return h


def state_at(log: Log, session_id: str, seq: int | None = None) -> SessionState:
    """The session folded to `seq` (None: the head): from its snapshots on a SQLite log, from
    every event otherwise."""
    snaps = Snapshots.for_log(log)
    if snaps is not None:
        return snaps.state_at(session_id, seq)
    events_ = log.read(session_id, 0, seq)
    if not events_:
        raise SessionNotFound(session_id)
    return fold(events_)
