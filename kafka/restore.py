"""`loopstream kafka restore`: after a broker lost its state (a wiped data dir, a recreated
topic), publish the accepted events a local projection holds to the events topic again, so
no session is lost, and record the restore so that every waiting process rebuilds its
projection and takes work again. Procedure and guarantees: docs/kafka.md#broker-state-loss."""
from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from loopstream.core.codec import decode
from loopstream.core.log import LogError
from loopstream.kafka import clients
from loopstream.kafka.contract import KafkaBus
from loopstream.kafka.log import partition_for, restores_topic
from loopstream.kafka.projection import H_BATCH, H_INDEX, H_SIZE, H_TYPE, H_WRITER, Projection
from loopstream.kafka.settings import TopicSpec


class RestoreRefused(LogError):
    """Nothing to restore, or nothing to restore from (a one-line user error)."""


@dataclass
class Restored:
    sessions: int
    events: int
    topic_id: str | None
    partitions: int
    backup: Path


def restore(kbus: KafkaBus, projection_path: Path, *, force: bool = False, timeout: float = 30.0) -> Restored:
    """Publish every event of the projection at `projection_path` to `kbus`'s events topic
    (each as a batch of one, in seq order: the acceptance rule takes each session back as it
    was, and drops as duplicates what the topic holds already), then record the restore in
    `<events topic>.restores`. The projection is first copied to `<file>.lost-<time>`; the
    processes using it rebuild it from the topic once they see the restore."""
    path = Path(projection_path)
    if not path.is_file():
        raise RestoreRefused(f"no projection at {path}: give the --db of a worker that served {kbus.events_topic}")
    backup = path.with_name(f"{path.name}.lost-{time.strftime('%Y%m%dT%H%M%S')}")
    _copy(path, backup)
    source = Projection(backup, kbus.events_topic)
    admin = clients.admin(kbus.bootstrap, kbus.settings)
    producer = None
    try:
        recorded_id, recorded_parts = source.identity()
        spec = kbus.settings.topics.spec("events")
        if recorded_parts and not kbus.settings.topics.partitions_set:
            spec = TopicSpec(recorded_parts, spec.replication_factor, spec.configs, False, "events")
        parts = clients.ensure_topic(admin, kbus.events_topic, spec, timeout)
        found = clients.topic_identity(admin, kbus.events_topic, timeout)
        topic_id = found[0] if found else None
        if not force and recorded_id and topic_id == recorded_id and parts == recorded_parts:
            backup.unlink()
            raise RestoreRefused(f"{kbus.events_topic} is the topic this projection was built from (topic id "
                                 f"{topic_id}): nothing was lost; --force publishes its events again anyway")
        producer = clients.producer(kbus.bootstrap, timeout=timeout, settings=kbus.settings)
        writer, failures, count = f"restore-{uuid.uuid4().hex}", [], 0
        infos = source.sessions()
        for info in infos:
            p = partition_for(info.session_id, parts)
            for data in source.read_raw(info.session_id):
                e = decode(data)
                headers = [(H_TYPE, e.type.encode()), (H_BATCH, uuid.uuid4().hex.encode()),
                           (H_INDEX, b"0"), (H_SIZE, b"1"), (H_WRITER, writer.encode())]
                while True:
                    try:
                        producer.produce(kbus.events_topic, key=info.session_id.encode(), value=data, partition=p,
                                         headers=headers,
                                         on_delivery=lambda err, _msg: err is not None and failures.append(err))
                        break
                    except BufferError:  # the local queue is full: let it drain
                        producer.poll(0.5)
                count += 1
                producer.poll(0)
        left = producer.flush(timeout)
        if left or failures:
            raise LogError(f"restore: the broker did not acknowledge {left + len(failures)} of {count} events "
                           f"({failures[:1]}); run it again: events already restored are not duplicated")
        mark = {"topic": kbus.events_topic, "topic_id": topic_id, "partitions": parts, "sessions": len(infos),
                "events": count, "time_ms": int(time.time() * 1000), "from": str(path)}
        clients.ensure_topic(admin, restores_topic(kbus.events_topic),
                             TopicSpec(1, spec.replication_factor, {"cleanup.policy": "delete", "retention.ms": "-1"},
                                       False, "restores"), timeout)
        producer.produce(restores_topic(kbus.events_topic), key=b"restore", value=json.dumps(mark).encode())
        if producer.flush(timeout):
            raise LogError("restore: the broker did not acknowledge the restore record; run it again")
        return Restored(len(infos), count, topic_id, parts, backup)
    finally:
        source.close()
        if producer is not None:
            clients.close(producer)


def _copy(path: Path, backup: Path) -> None:
    """A consistent copy of the projection (other processes may be writing to it)."""
    try:
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        dst = sqlite3.connect(str(backup))
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
    except sqlite3.Error as exc:
        raise RestoreRefused(f"cannot copy the projection {path}: {exc}") from None
