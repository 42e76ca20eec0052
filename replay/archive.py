"""Sessions as files: the stored bytes of every event, exactly as the log holds them.

An archive is an Avro object container file (self-describing, readable by any Avro
tool) of records `{seq, data}`, where `data` is one event's stored bytes. Nothing is
decoded or re-encoded on the way, so the hash chain verifies from the file just as it
did from the log, and an archive written today replays under tomorrow's code (the test
fixtures in tests/fixtures/sessions are archives).
"""
from __future__ import annotations

from pathlib import Path

from fastavro import parse_schema, reader, writer

from loopstream.core.log import Log, SessionNotFound

ARCHIVE_SCHEMA = parse_schema({
    "type": "record", "name": "StoredEvent", "namespace": "loopstream.archive",
    "fields": [{"name": "seq", "type": "long"}, {"name": "data", "type": "bytes"}],
})


def export_session(log: Log, session_id: str, path: str | Path, *, to_seq: int | None = None) -> int:
    """Write `session_id`'s stored event bytes to `path`; returns the number of events."""
    raw = log.read_raw(session_id, 0, to_seq)
    if not raw:
        raise SessionNotFound(session_id)
    write_archive(path, raw, session_id)
    return len(raw)


def write_archive(path: str | Path, raw: list[bytes], session_id: str = "") -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        writer(f, ARCHIVE_SCHEMA, ({"seq": i, "data": b} for i, b in enumerate(raw)),
               metadata={"loopstream.session_id": session_id})


def read_archive(path: str | Path) -> list[bytes]:
    """The stored event bytes of an archive, in seq order."""
    with open(path, "rb") as f:
        records = list(reader(f))
    for i, r in enumerate(records):
        if r["seq"] != i:
            raise ValueError(f"{path}: record {i} holds seq {r['seq']}")
    return [r["data"] for r in records]
