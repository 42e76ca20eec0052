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
import hashlib
import io
import pickle
import sqlite3
import sys
from collections.abc import Sequence

import pydantic

from loopstream.core import conversation, events, fsm, policy, sampling, state
from loopstream.core.construct import factory
from loopstream.core.conversation import Message, MessageList, ToolCall
from loopstream.core.log import Log, LogError, SessionNotFound
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import SessionState, fold

STRIDE = 128  # a row every STRIDE events: the fold past the last row is at most this long
_FIELDS = tuple(f.name for f in dataclasses.fields(SessionState) if f.name != "messages")


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


_new_message = factory(Message)
_new_call = factory(ToolCall)


def _dump_messages(messages: Sequence[Message]) -> list[tuple]:
    return [(m.role, m.content, [(c.call_id, c.name, c.arguments) for c in m.tool_calls], m.tool_call_id, m.name,
             m.seq) for m in messages]


def _load_messages(rows: list[tuple]) -> list[Message]:
    return [_new_message({"role": r, "content": c, "tool_calls": [_new_call({"call_id": i, "name": n, "arguments": a})
                                                                   for i, n, a in calls],
                          "tool_call_id": t, "name": name, "seq": seq})
            for r, c, calls, t, name, seq in rows]


class Snapshots:
    """The snapshot rows of one SQLite log (`for_log`: None for a log without a SQLite file)."""

    def __init__(self, log: SQLiteLog) -> None:
        self.log = log
        self.writable = not log.readonly
        self._ready = False
        self.folded = 0  # events the last `state_at` folded past its row

    @classmethod
    def for_log(cls, log: Log) -> Snapshots | None:
        return cls(log) if isinstance(log, SQLiteLog) else None

    def _table(self) -> bool:
        if not self._ready:
            conn = self.log.db.conn
            with self.log._lock:
                have = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'snapshots'").fetchone()
            if not have and self.writable:
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
        base = self._nearest(session_id, seq)
        rest = self.log.read(session_id, base.seq + 1, seq) if base is not None else self.log.read(session_id, 0, seq)
        self.folded = len(rest)
        return fold(rest, base) if base is not None else fold(rest)

    def _nearest(self, session_id: str, seq: int) -> SessionState | None:
        if not self._table():
            return None
        sid, top = session_id, seq
        for _ in range(1000):  # the session's rows, then its parent's (a fork by reference)
            with self.log._lock:
                row = self.log.db.conn.execute(
                    "SELECT seq FROM snapshots WHERE session_id = ? AND seq <= ? AND version = ? "
                    "ORDER BY seq DESC LIMIT 1", (sid, top, VERSION)).fetchone()
            if row is not None:
                got = self._load(sid, row[0])
                if got is not None and self._matches(session_id, got):
                    return got
                return None
            link = self.log.parent_of(sid)
            if link is None or link[0] is None:
                return None
            sid, top = link[0], min(top, link[1])
        return None

    def _load(self, session_id: str, seq: int) -> SessionState | None:
        """The state of one row, its messages gathered along its bases; None if unreadable."""
        chunks: list[list[tuple]] = []
        fields: dict | None = None
        sid, at = session_id, seq
        try:
            while sid is not None:
                with self.log._lock:
                    row = self.log.db.conn.execute(
                        "SELECT base_session, base_seq, version, data FROM snapshots WHERE session_id = ? AND seq = ?",
                        (sid, at)).fetchone()
                if row is None or row[2] != VERSION:
                    return None
                got_fields, messages = _Unpickler(io.BytesIO(row[3])).load()
                fields = got_fields if fields is None else fields
                chunks.append(messages)
                sid, at = row[0], row[1]
                if len(chunks) > 100_000:
                    return None
            out = object.__new__(SessionState)
            for name in _FIELDS:
                setattr(out, name, fields[name])  # type: ignore[index]
            out.messages = MessageList(_load_messages([m for chunk in reversed(chunks) for m in chunk]))
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
        """Store a row for `s` (the state after its event `s.seq`, of session `s.session_id`
        or of a fork by reference folded that far); nothing if the log cannot be written."""
        if not self.writable or s.seq < 0 or not self._table():
            return
        sid = s.session_id
        try:
            with self.log._lock:
                prev = self.log.db.conn.execute(
                    "SELECT session_id, seq, n_messages, rewrites FROM snapshots WHERE session_id = ? AND seq < ? "
                    "AND version = ? ORDER BY seq DESC LIMIT 1", (sid, s.seq, VERSION)).fetchone()
                if prev is None:  # a fork by reference builds on its parent's rows
                    prev = self._parent_row(sid, s.seq)
            messages = list(s.messages)
            base: tuple[str | None, int | None] = (None, None)
            if prev is not None and prev[3] == s.rewrites and prev[2] <= len(messages):
                base, messages = (prev[0], prev[1]), messages[prev[2]:]
            data = pickle.dumps(({n: getattr(s, n) for n in _FIELDS}, _dump_messages(messages)), protocol=5)
            with self.log.transaction() as conn:
                conn.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (sid, s.seq, VERSION, base[0], base[1], len(s.messages), s.rewrites, data))
        except (sqlite3.Error, LogError):
            return  # a projection: the events are the truth, the row is rebuilt later

    def _parent_row(self, session_id: str, seq: int) -> tuple | None:
        link = self.log.parent_of(session_id)
        if link is None or link[0] is None:
            return None
        return self.log.db.conn.execute(
            "SELECT session_id, seq, n_messages, rewrites FROM snapshots WHERE session_id = ? AND seq <= ? "
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
