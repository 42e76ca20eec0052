"""Open the log a command should use: `--bus sqlite:///path.db` / `--db path` (embedded
default), or `--bus kafka://host:port` (needs the [kafka] extra)."""
from __future__ import annotations

import os
from pathlib import Path

from loopstream.core.log import Log
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.kafka.contract import ContractError, parse_kafka_url

try:  # the [kafka] extra
    from loopstream.kafka.log import KafkaLog
except ImportError:  # pragma: no cover - the Kafka client is not installed
    KafkaLog = None  # type: ignore[assignment,misc]

DEFAULT_DB = Path(".loopstream") / "loopstream.db"


class BusError(ValueError):
    pass


def default_db() -> Path:
    return Path(os.environ.get("LOOPSTREAM_DB") or DEFAULT_DB)


def open_log(bus: str | None = None, db: str | Path | None = None) -> Log:
    bus = bus or os.environ.get("LOOPSTREAM_BUS") or None
    if bus is None or bus.startswith("sqlite://"):
        path = Path(bus[len("sqlite://"):]) if bus else Path(db) if db else default_db()
        try:
            return SQLiteLog(path)
        except Exception as exc:  # sqlite3 errors for unwritable paths, directories, non-db files
            raise BusError(f"cannot open the SQLite log at {path}: {exc}") from None
    if bus.startswith("kafka://"):
        if KafkaLog is None:
            raise BusError("the Kafka log needs the [kafka] extra: pip install 'loopstream[kafka]'")
        try:  # kafka://HOST:PORT[?prefix=NAME&librdkafka.setting=V]: see kafka/contract.py
            url = parse_kafka_url(bus)
        except ContractError as exc:
            raise BusError(str(exc)) from None
        projection = Path(db) if db else default_db().with_name(url.projection_name)
        return KafkaLog(url.bootstrap, topic=url.events_topic, projection_path=projection,
                        consumer_config=url.consumer_config or None)
    raise BusError(f"unknown bus {bus!r}: use sqlite:///PATH or kafka://HOST:PORT")

