"""The distributed log: one Kafka topic keyed by `session_id`, read through a local SQLite
projection (kafka/projection.py). How appends, the acceptance rule and subscriptions work,
and what they cost: docs/kafka.md."""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from loopstream.core.codec import decode, decode_session, encode
from loopstream.core.events import Event
from loopstream.core.log import Delivery, LogError, LogLost, SessionInfo, check_batch
from loopstream.kafka import clients
from loopstream.kafka.clients import EVENTS, KafkaError, KafkaException, TopicPartition
from loopstream.kafka.projection import (  # noqa: F401  (DROPPED: for callers)
    ACCEPTED,
    DROPPED,
    H_BATCH,
    H_INDEX,
    H_SIZE,
    H_TYPE,
    H_WRITER,
    PENDING,
    Projection,
    Record,
)
from loopstream.kafka.settings import KafkaSettings

logger = logging.getLogger("loopstream.kafka")
RESTORE_HINT = ("this process takes no more work until the sessions are restored: loopstream kafka restore "
                "--bus kafka://… (docs/kafka.md#broker-state-loss)")
VERIFY_EVERY_S = 5.0  # how often a running log checks that its topic is the one it projected
RESTORE_CHECK_S = 2.0  # how often a log that lost its topic looks for a restore


def restores_topic(events_topic: str) -> str:
    """The topic `loopstream kafka restore` records each restore in (one JSON record each)."""
    return f"{events_topic}.restores"


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


# -- the log -----------------------------------------------------------------------------
class KafkaLog:
    """The `Log` interface over one Kafka topic plus a local SQLite projection.

    `settings` (default: the environment's, kafka/settings.py) give every client's properties
    and the topic's configs; `partitions` (default: the settings') is checked against an
    existing topic when given. `producer_config` / `consumer_config` / `tail_config` are merged
    over them into the producer, the subscription consumers, and the projection's tail
    consumer. `timeout` bounds every blocking step (flush, catch-up, topic creation).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str = "loopstream.events",
        projection_path: str | Path | None = None,
        partitions: int | None = None,
        *,
        settings: KafkaSettings | None = None,
        producer_config: dict[str, Any] | None = None,
        consumer_config: dict[str, Any] | None = None,
        tail_config: dict[str, Any] | None = None,
        timeout: float = 30.0,
        abandon_ms: int = 120_000,
    ) -> None:
        self.bootstrap, self.topic, self.timeout = bootstrap, topic, timeout
        self.settings = settings or clients.default_settings()
        ks = self.settings
        self.writer_id = uuid.uuid4().hex
        self._consumer_config = dict(consumer_config or {})
        self._lock = threading.RLock()
        self._subs: list[KafkaSubscription] = []
        self._closed = False
        self.admin = clients.admin(bootstrap, ks)
        self.partitions = clients.ensure_topic(self.admin, topic, ks.topics.spec("events", partitions), timeout)
        self._producer_config = producer_config
        self._producer = clients.producer(bootstrap, timeout=timeout, overrides=producer_config, settings=ks)
        # A position beyond the end of a partition is an error, not a silent jump to its end:
        # the broker lost records (docs/kafka.md#broker-state-loss).
        self._tail_config = {"auto.offset.reset": "error", **(tail_config or {})}
        self._tail = clients.reader(bootstrap, "loopstream-projection", EVENTS, self._tail_config, settings=ks)
        self._probe: Any = None
        self._lost: str | None = None
        self._lost_at = 0.0
        self._verified_at = 0.0
        self._restore_checked = 0.0
        self._probed: dict[int, int] = {}  # partition -> position checked to be within the topic
        self.generation = 0  # +1 each time the log resumes after a restore
        # An idle consumer for watermark queries: on the tail consumer they would queue
        # behind its in-flight fetch.
        self._meta = clients.reader(bootstrap, "loopstream-watermarks", EVENTS, settings=ks)
        try:
            self.projection = Projection(projection_path, topic, abandon_ms=abandon_ms)
        except BaseException:
            self._close_clients()
            raise
        stored = self.projection.positions()
        self._pos = {p: stored.get(p, 0) for p in range(self.partitions)}
        self._tail.assign([TopicPartition(topic, p, off) for p, off in self._pos.items()])
        self._verify()

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
            self._guard()
            if time.monotonic() - self._verified_at > VERIFY_EVERY_S:
                self._verify()
                self._guard()
            if until is None:
                parts = range(self.partitions) if partitions is None else partitions
                until = {p: self._high_watermark(p) for p in parts}
                ahead = {p: off for p, off in until.items() if off < self._pos.get(p, 0)}
                if ahead:
                    generation = self.generation
                    self._check_ahead(ahead)
                    if self.generation != generation:  # resumed from a restore: another topic now
                        parts = range(self.partitions) if partitions is None else \
                            [p for p in partitions if p < self.partitions]
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
                        elif err.code() in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE):
                            self._lose(f"offsets out of range in {self.topic}: the projection is at {self._pos} "
                                       f"but the broker no longer has those records ({err.str()})")
                            self._guard()
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

    # -- broker state loss -------------------------------------------------------------
    @property
    def lost(self) -> str | None:
        """Why the topic no longer holds what this log projected (None while it does)."""
        return self._lost

    def _lose(self, reason: str) -> None:
        if self._lost is None:
            self._lost, self._lost_at = reason, time.time()
            logger.error("KAFKA BROKER STATE LOST: %s; %s", reason, RESTORE_HINT)

    def _guard(self) -> None:
        """LogLost while the topic is lost; looks for a restore every RESTORE_CHECK_S."""
        if self._lost is None:
            return
        if time.monotonic() - self._restore_checked >= RESTORE_CHECK_S:
            self._restore_checked = time.monotonic()
            self._verify()
        if self._lost is not None:
            raise LogLost(f"the Kafka broker lost the log: {self._lost}; {RESTORE_HINT}")

    def _verify(self) -> None:
        """Check that the topic is the one the projection holds (same id, same partition
        count); record it on first use; resume from a restore of a recreated topic."""
        self._verified_at = time.monotonic()
        try:
            found = clients.topic_identity(self.admin, self.topic, min(self.timeout, 3.0))
        except LogError as exc:  # unreachable: not a loss (yet); reads and appends will say so
            logger.debug("cannot check topic %s: %s", self.topic, exc)
            return
        tid, parts = self.projection.identity()
        empty = self.projection.is_empty()
        if found is None:
            if not empty:
                self._lose(f"topic {self.topic} is gone from the broker")
            return
        new_tid, new_parts = found
        if empty or (tid is None and parts is None):
            if (tid, parts) != (new_tid, new_parts):
                self.projection.remember(new_tid, new_parts)
            if new_parts != self.partitions:
                self._adopt(new_parts)
            return
        if tid and new_tid and tid != new_tid:
            reason = f"topic {self.topic} was recreated (topic id {tid} is now {new_tid})"
        elif parts is not None and new_parts != parts:
            reason = f"topic {self.topic} has {new_parts} partitions; its projection was built from {parts}"
        elif self._lost is not None and self._restored(new_tid, new_parts):
            reason = ""  # same topic, restored in place (a broker without topic ids)
        else:
            return
        if self._restored(new_tid, new_parts):
            self._resume(new_tid, new_parts)
        else:
            self._lose(reason)

    def _restored(self, topic_id: str | None, partitions: int) -> bool:
        """A restore was recorded for the topic as it is now (kafka/restore.py)."""
        try:
            records = clients.read_topic(self.bootstrap, restores_topic(self.topic), self.settings, 5.0)
        except LogError:
            return False
        for m in reversed(records):
            try:
                mark = json.loads(m.value() or b"{}")
            except ValueError:
                continue
            if topic_id is not None:
                return mark.get("topic_id") == topic_id
            return mark.get("partitions") == partitions and mark.get("time_ms", 0) / 1000 >= self._lost_at > 0
        return False

    def _resume(self, topic_id: str | None, partitions: int) -> None:
        """Rebuild the projection from the restored topic and restart the subscriptions."""
        self.projection.reset(topic_id, partitions)
        self._adopt(partitions)
        for sub in self._subs:
            sub.restart()
        self.generation += 1
        if self._lost is not None:
            logger.warning("Kafka log resumed: %s was restored (topic id %s); the projection is rebuilt from it",
                           self.topic, topic_id)
        self._lost = None

    def _adopt(self, partitions: int) -> None:
        """Read every partition of the topic from the projection's stored positions."""
        self.partitions = partitions
        stored = self.projection.positions()
        self._pos = {p: stored.get(p, 0) for p in range(partitions)}
        self._probed.clear()
        # New clients: the old ones cache the metadata of the lost topic (its partitions).
        self._tail.close()
        self._meta.close()
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        self._producer.flush(self.timeout)
        clients.close(self._producer)
        ks = self.settings
        self._producer = clients.producer(self.bootstrap, timeout=self.timeout, overrides=self._producer_config,
                                          settings=ks)
        self._meta = clients.reader(self.bootstrap, "loopstream-watermarks", EVENTS, settings=ks)
        self._tail = clients.reader(self.bootstrap, "loopstream-projection", EVENTS, self._tail_config, settings=ks)
        self._tail.assign([TopicPartition(self.topic, p, off) for p, off in self._pos.items()])

    def _check_ahead(self, ahead: dict[int, int]) -> None:
        """The projection is past a partition's high watermark: the topic was recreated or
        truncated, unless the record before our position is still there (Tansu reports the
        high watermark of a multi-record batch as its first offset + 1)."""
        self._verify()
        self._guard()
        for p in ahead:
            pos = self._pos[p]
            if self._probed.get(p) == pos:
                continue
            if self._probe is None:
                self._probe = clients.reader(self.bootstrap, "loopstream-probe", EVENTS,
                                             {"auto.offset.reset": "error"}, settings=self.settings)
            self._probe.assign([TopicPartition(self.topic, p, pos - 1)])
            lost = False
            try:
                deadline = time.monotonic() + min(self.timeout, 5.0)
                while time.monotonic() < deadline:
                    m = self._probe.poll(0.1)
                    if m is None:
                        continue
                    err = m.error()
                    if err is None and m.offset() == pos - 1:
                        self._probed[p] = pos
                        break
                    if err is not None and err.code() in (KafkaError._AUTO_OFFSET_RESET,
                                                          KafkaError.OFFSET_OUT_OF_RANGE, KafkaError._PARTITION_EOF):
                        lost = True
                        break
                else:  # nothing at all (Tansu answers a fetch beyond the end with no records)
                    lost = self._high_watermark(p) < pos
            finally:
                self._probe.unassign()
            if lost:
                self._lose(f"the projection of {self.topic}[{p}] is at offset {pos}, beyond the topic's end "
                           f"({ahead[p]}): the broker lost records")
        self._guard()

    # -- writing ---------------------------------------------------------------------
    def append(self, session_id: str, events: Sequence[Event], expected_seq: int) -> None:
        """Check against the projection, produce, then read the verdict of the acceptance
        rule: a batch that lost a race raises what the SQLite log's append says of it now."""
        check_batch(session_id, events, expected_seq)
        p = self.partition(session_id)
        with self._lock:
            self.catch_up([p])
            self.projection.store.check(session_id, events, expected_seq)
            offsets = self._produce(session_id, events)
            self.catch_up(until={p: offsets[-1] + 1})
            verdicts = {self.projection.verdict(p, o) for o in offsets}
            if verdicts == {(ACCEPTED, None)}:
                return
            self.projection.store.check(session_id, events, expected_seq)  # DuplicateEvent, ConcurrencyError
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
            self._close_clients()
            self._subs.clear()
            self.projection.close()
            if left:
                raise LogError(f"{left} records were still unacknowledged when the log closed")

    def _close_clients(self) -> None:
        clients.close(self._producer)
        self._producer = None  # type: ignore[assignment]
        self._tail.close()
        self._meta.close()
        if self._probe is not None:
            self._probe.close()

    def __enter__(self) -> KafkaLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KafkaSubscription:
    """A consumer-group member over the topic that delivers accepted events only."""

    def __init__(self, log: KafkaLog, group: str) -> None:
        self.log, self.group = log, group
        self._committed: dict[int, int] = {}
        self._closed = False
        self._from_start: set[int] | bool = False  # after a restore: partitions already read from the start
        self._consumer = self._join()

    def _join(self) -> Any:
        consumer = clients.member(self.log.bootstrap, self.group, EVENTS, self.log._consumer_config,
                                  settings=self.log.settings)
        consumer.subscribe([self.log.topic])
        return consumer

    def restart(self) -> None:
        """After a restore (KafkaLog._resume): read each partition again from its start (the
        group's offsets named records of the lost topic). The consumer stays in its group (on
        Tansu, a member that leaves while rejoining wedges the group); its metadata is
        refreshed so a changed partition count rebalances it."""
        if self._closed:
            return
        self._committed.clear()
        self._from_start = set()
        try:
            self._consumer.list_topics(self.log.topic, timeout=5)
        except KafkaException:
            pass

    def _rewind_restored(self) -> None:
        if self._from_start is False:
            return
        for tp in self._consumer.assignment():
            if tp.partition in self._from_start:
                continue
            try:
                self._consumer.seek(TopicPartition(self.log.topic, tp.partition, 0))
                self._from_start.add(tp.partition)
            except KafkaException:
                pass  # not fetching yet: the next poll tries again

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
        """Accepted events; LogLost while the broker's state is lost (kafka/log.py `_verify`)."""
        with self.log._lock:
            self.log._check_open()
            if time.monotonic() - self.log._verified_at > VERIFY_EVERY_S:
                self.log._verify()  # an idle partition must notice a lost topic too
            self.log._guard()
        self._rewind_restored()
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
