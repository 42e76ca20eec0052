"""Inspect a log without changing it: the list of sessions with what each is doing now,
and one session's events with its hash chain checked (`loopstream sessions` / `show`).

A session is `interrupted` when it has not ended, does not wait for a person, and no live
process drives it: no `run`/`resume` holds its lease and no worker serves the log
(runtime/lease.py). Only a SQLite log has leases; a Kafka log's sessions are driven by its
workers and keep the status their last event gives them.

The model a row and `show` report is the one that answered (ModelResponded `model`): a
session started from a Kafka goal records the model its orchestrator was given, by default
`provider=any model=default` (whichever model worker takes its steps), in SessionStarted.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from loopstream.core import events as ev
from loopstream.core.codec import decode_prefix
from loopstream.core.describe import status_of
from loopstream.core.fsm import ANNOTATIONS
from loopstream.core.log import Log, SessionInfo, SessionNotFound
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.replay.chain import ChainReport, check_complete, verify_raw
from loopstream.runtime import lease

INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class SessionRow:
    session_id: str
    created_ms: int
    updated_ms: int
    status: str  # done | failed | cancelled | awaiting approval | running | interrupted
    events: int
    goal: str  # "" when the session has none; a note when its first events cannot be read
    model: str = ""  # the model of the last reply; before one, the model SessionStarted names
    parent: str = ""  # a child session's parent (docs/subagents.md); "" at the top of a tree


def session_rows(log: Log, limit: int | None = None, only: Collection[str] | None = None) -> list[SessionRow]:
    """The newest `limit` sessions (all when None), oldest first; only those of `only` when
    given. A session whose events cannot be read still gets its row (its goal says why), so
    one bad session never hides the others."""
    infos = log.sessions()
    if only is not None:
        infos = [i for i in infos if i.session_id in only]
    if limit is not None:
        infos = infos[-limit:] if limit > 0 else []
    path = _lease_root(log)
    workers = path is not None and lease.workers_attached(path)
    rows = []
    for i in infos:
        goal, parent = _goal_and_parent(log, i.session_id)
        rows.append(SessionRow(i.session_id, i.created_ms, i.updated_ms, live_status(_ended(log, i), path, workers),
                               i.next_seq, goal, _model(log, i.session_id, i.next_seq), parent))
    return rows


def _ended(log: Log, info: SessionInfo) -> SessionInfo:
    """`info` with the type of the event that ended the session when an annotation (an eval's
    grade, feedback: core.fsm.ANNOTATIONS, legal only after the end) came last."""
    if info.last_type not in ANNOTATIONS:
        return info
    last = next((e.type for e in reversed(log.read(info.session_id)) if e.type not in ANNOTATIONS), info.last_type)
    return dataclasses.replace(info, last_type=last)


def live_status(info: SessionInfo, log_path: Path | None, workers: bool = False) -> str:
    """The status the last event gives, or `interrupted` when nothing drives the session."""
    status = status_of(info.last_type)
    if status != "running" or log_path is None or workers:
        return status
    return status if lease.holder(log_path, info.session_id) is not None else INTERRUPTED


def _lease_root(log: Log) -> Path | None:
    """The SQLite file leases are kept beside (None for a log without leases)."""
    return log.path if isinstance(log, SQLiteLog) else None


def _goal_and_parent(log: Log, session_id: str) -> tuple[str, str]:
    """The session's goal, and its parent session if it is a child ("" if not)."""
    events, error = decode_prefix(log.read_raw(session_id, 0, 2))  # seq 1: a MemoryRecalled may come first
    parent = next((e.payload.parent_session_id or "" for e in events if isinstance(e.payload, ev.SessionStarted)), "")
    for e in events:
        if isinstance(e.payload, ev.GoalReceived):
            return e.payload.text, parent
    return (f"(unreadable: {error})" if error is not None else ""), parent


def _model(log: Log, session_id: str, next_seq: int, chunk: int = 32) -> str:
    """The model of the session's last reply, read backwards from its end (most sessions end
    a few events after one); the model SessionStarted names when none answered yet."""
    end = next_seq - 1
    while end >= 0:
        start = max(0, end - chunk + 1)
        events, _ = decode_prefix(log.read_raw(session_id, start, end))
        for e in reversed(events):
            if isinstance(e.payload, ev.ModelResponded):
                return e.payload.model
            if isinstance(e.payload, ev.SessionStarted):
                return e.payload.model
        end = start - 1
    return ""


def answered_by(events: Sequence[ev.Event]) -> list[str]:
    """The models that answered (ModelResponded `model`), in the order of their first reply."""
    return list(dict.fromkeys(e.payload.model for e in events if isinstance(e.payload, ev.ModelResponded)))


@dataclass(frozen=True)
class ShownSession:
    """One session's events as stored, up to the first that cannot be read, and its chain."""

    session_id: str
    events: list[ev.Event]
    chain: ChainReport
    decode_error: str = ""  # why the event after the last one in `events` cannot be read

    @property
    def ok(self) -> bool:
        return self.chain.ok and not self.decode_error

    @property
    def problem(self) -> str:
        """One line naming the first bad seq ("" when the session is intact)."""
        bad_chain = None if self.chain.ok else self.chain.first_bad_seq
        bad_decode = len(self.events) if self.decode_error else None
        if bad_decode is not None and (bad_chain is None or bad_decode <= bad_chain):
            return f"first bad seq {bad_decode}: {self.decode_error}"
        if bad_chain is not None:
            return f"first bad seq {bad_chain}: {self.chain.reason}"
        return ""


def show_session(log: Log, session_id: str) -> ShownSession:
    """Read and check one session; never raises for a damaged session (see `.problem`)."""
    raw = log.read_raw(session_id)
    if not raw:
        raise SessionNotFound(session_id)
    return shown(session_id, raw, check_complete(log, session_id, verify_raw(raw, session_id), len(raw), None))


def shown(session_id: str, raw: Sequence[bytes], chain: ChainReport) -> ShownSession:
    events, error = decode_prefix(raw)
    return ShownSession(session_id, events, chain, str(error) if error is not None else "")
