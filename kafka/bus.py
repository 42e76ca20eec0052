"""Open the log a command should use: `--bus sqlite:///path.db` / `--db path` (embedded
default), or `--bus kafka://host:port` (needs the [kafka] extra)."""
from __future__ import annotations

import os
from pathlib import Path

from loopstream.core.log import Log
from loopstream.core.sqlite_log import LogNotFound, LogUnavailable, SQLiteLog
from loopstream.kafka.contract import ContractError, parse_kafka_url
from loopstream.kafka.settings import KafkaConfigError, KafkaSettings

try:  # the [kafka] extra
    from loopstream.kafka.log import KafkaLog
except ImportError:  # pragma: no cover - the Kafka client is not installed
    KafkaLog = None  # type: ignore[assignment,misc]

DEFAULT_DB = Path(".loopstream") / "loopstream.db"


class BusError(ValueError):
    pass


def default_db() -> Path:
    return Path(os.environ.get("LOOPSTREAM_DB") or DEFAULT_DB)


def sqlite_path(bus: str | None = None, db: str | Path | None = None) -> Path | None:
    """The SQLite file `open_log(bus, db)` opens, or None when the bus is not SQLite."""
    bus = bus or os.environ.get("LOOPSTREAM_BUS") or None
    if bus is None or bus.startswith("sqlite://"):
        return Path(bus[len("sqlite://"):]) if bus else Path(db) if db else default_db()
    return None


def open_log(bus: str | None = None, db: str | Path | None = None, *, readonly: bool = False,
             durability: str | None = None, kafka: KafkaSettings | None = None) -> Log:
    """The log a command uses. `readonly` (commands that only read): a SQLite log is opened
    read-only and must exist (`LogNotFound` otherwise); nothing is created. `durability`:
    a SQLite log's (core/sqlite_log.py DURABILITY; a Kafka log's is the broker's). `kafka`:
    a Kafka log's client and topic settings (default: the environment's, kafka/settings.py)."""
    bus = bus or os.environ.get("LOOPSTREAM_BUS") or None
    path = sqlite_path(bus, db)
    if path is not None:
        try:
            return SQLiteLog(path, readonly=readonly, durability=durability)
        except LogNotFound:
            raise
        except LogUnavailable as exc:
            raise BusError(str(exc)) from None
        except Exception as exc:  # OS errors for unusable paths (a directory, a file where a folder belongs)
            raise BusError(f"cannot open the SQLite log at {path}: {exc}") from None
    if bus.startswith("kafka://"):
        if KafkaLog is None:
            raise BusError("the Kafka log needs the [kafka] extra: pip install 'loopstream[kafka]'")
        try:  # kafka://HOST:PORT[?prefix=NAME&librdkafka.setting=V]: see kafka/contract.py
            url = parse_kafka_url(bus, kafka)
            projection = Path(db) if db else default_db().with_name(url.projection_name)
            return KafkaLog(url.bootstrap, topic=url.events_topic, projection_path=projection,
                            consumer_config=url.consumer_config or None, settings=url.settings)
        except (ContractError, KafkaConfigError) as exc:
            raise BusError(str(exc)) from None
    raise BusError(f"unknown bus {bus!r}: use sqlite:///PATH or kafka://HOST:PORT")

