"""Every Kafka client loopstream makes: the settings, one factory, `ensure_topic`, and the
producer of the goal contract. The only module that imports confluent-kafka (a test checks).

Each client is `{"bootstrap.servers": …, **SETTINGS[kind], **the deployment's properties for
its kind (kafka/settings.py: --kafka-config file, LOOPSTREAM_KAFKA_* variables), **what the
caller adds}`: a consumer group or a name, a transactional id, the isolation level of the
topic it reads, and the overrides of the bus URL (`kafka://…?session.timeout.ms=2000`,
consumers only). Why each setting is what it is: docs/kafka.md.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from loopstream.core.log import LogError
from loopstream.kafka import settings as ksettings
from loopstream.kafka.settings import KafkaConfigError, KafkaSettings, TopicSpec

try:  # the [kafka] extra; without it this module still imports (a SQLite-only install)
    from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicCollection, TopicPartition
    from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType
except ImportError:  # pragma: no cover - exercised only without the extra
    Consumer = Producer = AdminClient = NewTopic = TopicPartition = KafkaError = None  # type: ignore[assignment,misc]
    TopicCollection = None  # type: ignore[assignment,misc]
    ConfigResource = ResourceType = None  # type: ignore[assignment,misc]

    class KafkaException(Exception):  # type: ignore[no-redef]
        """Stands in for confluent_kafka.KafkaException in `except` clauses."""

SETTINGS: dict[str, dict[str, Any]] = {
    # Every producer: events (KafkaLog), goals and updates (ContractProducer), the relay.
    "producer": {
        # The broker drops the duplicates librdkafka's own retries would write, and keeps
        # one producer's records in order: the acceptance rule relies on that order to give
        # up on an incomplete batch as soon as a later record of its writer lands.
        "enable.idempotence": True,
        # Acknowledged = written to every in-sync replica (idempotence requires "all").
        "acks": "all",
        # Records produced within 5 ms travel together (one append's batch, one request).
        "linger.ms": 5,
    },
    # A member of a consumer group: log subscriptions (the worker roles, the relay), the goal intake.
    "member": {
        # Offsets are committed by hand once a record is handled (at-least-once), never on
        # a timer and never on poll: a crash redelivers whatever was not finished.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        # A group without a committed offset starts at the beginning: it owes everything.
        "auto.offset.reset": "earliest",
        # The smallest session timeout a stock Kafka broker accepts: a dead member's
        # partitions go to the others after 6 s. Tansu answers a JoinGroup only after about
        # half of it, so it also bounds how long a member waits to join.
        "session.timeout.ms": 6_000,
        "heartbeat.interval.ms": 1_000,
        # How long the broker may hold a fetch that has no new data.
        "fetch.wait.max.ms": 100,
    },
    # Partitions assigned by hand, no group membership, never commits: the projection's
    # tail, watermark queries, `submit --wait` reading the reply topic.
    "reader": {
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        # An event at the end of each partition: the projection knows it has caught up.
        "enable.partition.eof": True,
        # Tansu does not answer a waiting fetch when data arrives (with 500 ms a new record
        # took ~200 ms to show up), so this bounds every catch-up of the projection, and so
        # every append. Real Kafka answers at once: raise it there to save idle requests
        # (at 10 ms an idle log costs ~1% CPU here).
        "fetch.wait.max.ms": 10,
    },
    "admin": {},
}

# Events are never produced in transactions (the acceptance rule decides what is in the
# log): their readers wait for none. Goals and results may come from transactions (another
# system's, the results relay): their readers skip aborted records.
EVENTS, CONTRACT = "read_uncommitted", "read_committed"


def config(kind: str, bootstrap: str, *layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The librdkafka settings of a client of `kind` (a key of SETTINGS), then `layers` in order."""
    out = {"bootstrap.servers": bootstrap, **SETTINGS[kind]}
    for layer in layers:
        out.update(layer or {})
    return out


logger = logging.getLogger("loopstream.kafka")
_QUIET = logging.getLogger("loopstream.kafka.check")  # librdkafka's notices while checking settings
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False
ERROR_REPEAT_S = 60.0  # a client logs the same error at most once a minute
# The last authentication error any client of this process met (reported by `metadata`).
_auth_error: list[str] = []


def _require() -> None:
    if Producer is None:
        raise LogError("the Kafka bus needs the [kafka] extra: pip install 'loopstream[kafka]'")


def default_settings() -> KafkaSettings:
    """The settings of this process when a caller gives none: $LOOPSTREAM_KAFKA_CONFIG's file
    and the LOOPSTREAM_KAFKA_* variables (kafka/settings.py)."""
    return ksettings.load()


def _build(cls: Any, kind: str, conf: dict[str, Any], source: str) -> Any:
    """Construct a client; librdkafka's refusal of a property is a one-line KafkaConfigError."""
    _require()

    said: dict[str, float] = {}

    def on_error(err: Any) -> None:  # librdkafka's error callback, served by poll/flush
        if err.code() == KafkaError._AUTHENTICATION:
            _auth_error[:] = [err.str()]
        now = time.monotonic()
        if now - said.get(err.str(), -ERROR_REPEAT_S) >= ERROR_REPEAT_S:  # librdkafka repeats them
            said[err.str()] = now  # debug: librdkafka prints its errors on stderr itself
            logger.debug("kafka %s %s: %s", kind, conf.get("client.id", ""), err.str())

    try:
        return cls({**conf, "error_cb": on_error})
    except KafkaException as exc:
        err = exc.args[0]
        why = err.str() if hasattr(err, "str") else str(err)
        name = why.split('"')[1] if why.count('"') >= 2 else ""
        hint = ksettings.suggest_property(name) if why.startswith("No such configuration property") else ""
        where = "" if source == "defaults" else f" (settings from {source})"
        raise KafkaConfigError(f"kafka {kind} client: {why}{hint}{where}") from None


def producer(bootstrap: str, *, timeout: float = 30.0, transactional_id: str | None = None,
             overrides: Mapping[str, Any] | None = None, settings: KafkaSettings | None = None) -> Any:
    """An idempotent producer; `timeout` bounds the delivery of each record."""
    settings = settings or default_settings()
    own: dict[str, Any] = {"message.timeout.ms": int(timeout * 1000)}
    if transactional_id:
        own["transactional.id"] = transactional_id
    return _build(Producer, "producer", config("producer", bootstrap, settings.properties("producer"), own, overrides),
                  settings.source)


def member(bootstrap: str, group: str, isolation: str, overrides: Mapping[str, Any] | None = None,
           settings: KafkaSettings | None = None) -> Any:
    """A consumer in group `group` (subscribe it; commit by hand)."""
    settings = settings or default_settings()
    own = {"group.id": group, "isolation.level": isolation}
    return _build(Consumer, "consumer", config("member", bootstrap, settings.properties("consumer"), own, overrides),
                  settings.source)


def reader(bootstrap: str, name: str, isolation: str, overrides: Mapping[str, Any] | None = None,
           settings: KafkaSettings | None = None, *, group: str | None = None) -> Any:
    """A consumer of partitions assigned by hand; `name` starts its group id (never joined, so
    no static membership: `group.instance.id` is for group members only). With `group`, its
    group id is that group's, to read the group's committed offsets (it never commits)."""
    settings = settings or default_settings()
    props = {k: v for k, v in settings.properties("consumer").items() if k != "group.instance.id"}
    own = {"group.id": group or f"{name}-{uuid.uuid4().hex[:12]}", "isolation.level": isolation}
    return _build(Consumer, "consumer", config("reader", bootstrap, props, own, overrides), settings.source)


def admin(bootstrap: str, settings: KafkaSettings | None = None) -> Any:
    settings = settings or default_settings()
    return _build(AdminClient, "admin", config("admin", bootstrap, settings.properties("admin")), settings.source)


def check(settings: KafkaSettings) -> None:
    """Build (and drop) one client of each kind from `settings` without connecting anywhere:
    a property librdkafka does not know, or a value it refuses, is a KafkaConfigError now,
    not in a worker's thread later."""
    for cls, kind, extra in ((Producer, "producer", {}), (Consumer, "consumer", {"group.id": "check"}),
                             (AdminClient, "admin", {})):
        client = _build(cls, kind, {**settings.properties(kind), **extra, "logger": _QUIET}, settings.source)
        close(client)


def lag(consumer: Any, topic: str, timeout: float = 10.0) -> dict[int, int]:
    """Per partition of `topic`: records after the committed offset of `consumer`'s group
    (`consumer` from `reader(..., group=G)`; a partition without a commit owes all it holds)."""
    try:
        parts = consumer.list_topics(topic, timeout=timeout).topics[topic].partitions
        committed = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=timeout)
        out = {}
        for tp in committed:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=timeout,
                                                       cached=False)
            out[tp.partition] = max(0, high - (tp.offset if tp.offset >= 0 else low))
        return out
    except (KafkaException, KeyError) as exc:
        raise LogError(f"cannot read the lag on {topic}: {exc}") from None


def metadata(admin_client: Any, topic: str | None = None, timeout: float = 30.0) -> Any:
    """The cluster's metadata (of `topic` only, if given); a broker that cannot be reached (or
    that refuses our credentials) is a LogError saying so in one line, not librdkafka's exception."""
    _auth_error.clear()
    deadline, slice_s = time.monotonic() + timeout, 0.5
    while True:  # in growing slices: refused credentials are reported at once, not after `timeout`
        step, slice_s = max(0.05, min(slice_s, deadline - time.monotonic())), slice_s * 2
        try:
            return admin_client.list_topics(topic, timeout=step) if topic else admin_client.list_topics(timeout=step)
        except KafkaException as exc:
            admin_client.poll(0)  # serve the error callback
            if _auth_error:
                raise LogError(f"the Kafka broker refused our credentials ({_auth_error[0]}): check the SASL/SSL "
                               "settings (--kafka-config, LOOPSTREAM_KAFKA_*)") from None
            if time.monotonic() >= deadline:
                raise LogError(f"cannot reach the Kafka broker ({exc.args[0].str()}): is one running at the "
                               "--bus address?") from None


def ensure_topic(admin_client: Any, topic: str, spec: TopicSpec | int = 3, timeout: float = 30.0) -> int:
    """Create `topic` as `spec` says (an int: that many partitions, nothing else set) unless it
    exists; wait until metadata shows it; its partition count. An existing topic is checked:
    another partition count than a configured one is a LogError; an events topic that
    deletes or compacts records is logged as an error (docs/kafka.md#durable-topics)."""
    spec = spec if isinstance(spec, TopicSpec) else TopicSpec(spec, check_partitions=False)
    md = metadata(admin_client, timeout=timeout)
    existing = md.topics.get(topic)
    if existing is None or existing.error is not None:
        new = NewTopic(topic, num_partitions=spec.partitions, replication_factor=spec.replication_factor,
                       config=dict(spec.configs))
        try:
            admin_client.create_topics([new])[topic].result(timeout=timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise LogError(f"cannot create topic {topic}: {exc.args[0].str()}") from None
    elif spec.kind == "events":
        _check_retention(admin_client, topic, timeout)
    deadline = time.monotonic() + timeout
    while True:
        t = metadata(admin_client, topic, timeout).topics.get(topic)
        if t is not None and t.error is None and t.partitions:
            count = len(t.partitions)
            if spec.check_partitions and count != spec.partitions:
                raise LogError(f"topic {topic} has {count} partitions but {spec.partitions} are configured: "
                               "sessions would be looked up in the wrong partition. Configure "
                               f"partitions = {count}, or migrate the topic (docs/kafka.md#partitions)")
            return count
        if time.monotonic() > deadline:
            raise LogError(f"topic {topic} did not appear")
        time.sleep(0.05)


def topic_identity(admin_client: Any, topic: str, timeout: float = 10.0) -> tuple[str | None, int] | None:
    """(topic id, partition count) of `topic`, None if the broker does not have it. The id
    is None where the broker reports none (DescribeTopics unsupported): a recreated topic
    is then known by its partition count and its offsets only."""
    try:
        found = admin_client.describe_topics(TopicCollection([topic]), request_timeout=timeout)[topic]
        desc = found.result(timeout=timeout)
        tid = str(desc.topic_id) if desc.topic_id is not None else None
        return tid or None, len(desc.partitions)
    except KafkaException as exc:
        code = exc.args[0].code()
        if code == KafkaError.UNKNOWN_TOPIC_OR_PART:
            return None
        if code not in (KafkaError._UNSUPPORTED_FEATURE, KafkaError.UNSUPPORTED_VERSION):
            raise LogError(f"cannot describe topic {topic}: {exc.args[0].str()}") from None
    except Exception:  # an older client: fall back to plain metadata
        pass
    t = metadata(admin_client, topic, timeout).topics.get(topic)
    if t is None or t.error is not None or not t.partitions:
        return None
    return None, len(t.partitions)


def read_topic(bootstrap: str, topic: str, settings: KafkaSettings | None = None,
               timeout: float = 10.0) -> list[Any]:
    """Every record of a small topic (partition 0), oldest first; [] if it does not exist."""
    settings = settings or default_settings()
    consumer = reader(bootstrap, "loopstream-control", CONTRACT, settings=settings)
    try:
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=timeout, cached=False)
        except KafkaException:
            return []
        if high <= low:
            return []
        consumer.assign([TopicPartition(topic, 0, low)])
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error() is not None:
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    break
                continue
            out.append(msg)
        return out
    finally:
        consumer.close()


def topic_configs(admin_client: Any, topic: str, timeout: float = 30.0) -> dict[str, str]:
    """The configs the broker reports for `topic` ({} if it reports none)."""
    try:
        futures = admin_client.describe_configs([ConfigResource(ResourceType.TOPIC, topic)])
        found = next(iter(futures.values())).result(timeout=timeout)
    except KafkaException as exc:
        raise LogError(f"cannot describe topic {topic}: {exc.args[0].str()}") from None
    return {k: v.value for k, v in found.items() if v.value is not None}


def _check_retention(admin_client: Any, topic: str, timeout: float) -> None:
    """Say loudly when an existing events topic would lose events (created by hand or by an
    older loopstream with the broker's 7-day default)."""
    try:
        cfg = topic_configs(admin_client, topic, timeout)
    except LogError as exc:
        logger.warning("could not check the retention of %s: %s", topic, exc)
        return
    bad = [f"{k}={cfg[k]}" for k in ("retention.ms", "retention.bytes") if cfg.get(k) not in (None, "-1")]
    if "compact" in cfg.get("cleanup.policy", ""):
        bad.append(f"cleanup.policy={cfg['cleanup.policy']}")
    if bad:
        logger.error("topic %s will DELETE session events (%s): the log is the only truth. Fix it with "
                     "kafka-configs.sh --alter --entity-type topics --entity-name %s --add-config "
                     "retention.ms=-1,retention.bytes=-1,cleanup.policy=delete (docs/kafka.md#durable-topics)",
                     topic, ", ".join(bad), topic)


class ContractProducer:
    """The producer of goals and updates; `send` returns once the broker acknowledged."""

    def __init__(self, bootstrap: str, *, timeout: float = 30.0, settings: KafkaSettings | None = None) -> None:
        self.timeout = timeout
        self.settings = settings or default_settings()
        self._admin = admin(bootstrap, self.settings)
        self._producer = producer(bootstrap, timeout=timeout, settings=self.settings)
        self._topics: set[str] = set()

    def ensure_topic(self, topic: str, kind: str = "results") -> None:
        """Create `topic` (a `goals` or `results` topic: docs/kafka.md#durable-topics) unless known."""
        if topic in self._topics:
            return
        ensure_topic(self._admin, topic, self.settings.topics.spec(kind), self.timeout)
        self._topics.add(topic)

    def send(self, topic: str, key: str | bytes | None, value: bytes, headers: Sequence[tuple[str, bytes]] = (),
             kind: str = "results") -> None:
        self.ensure_topic(topic, kind)
        result: list[Any] = []
        try:
            self._producer.produce(topic, key=key.encode() if isinstance(key, str) else key, value=value,
                                   headers=list(headers),
                                   on_delivery=lambda err, msg: result.append(err))
        except (KafkaException, BufferError) as exc:
            raise LogError(f"cannot produce to {topic}: {exc}") from exc
        deadline = time.monotonic() + self.timeout
        while not result and time.monotonic() < deadline:
            self._producer.flush(min(1.0, max(0.0, deadline - time.monotonic())))
        if not result or result[0] is not None:
            raise LogError(f"{topic}: the broker did not acknowledge a record: "
                           f"{result[0] if result else 'timeout'}")

    def close(self) -> None:
        self._producer.flush(self.timeout)
        close(self._producer)


def close(client: Any) -> None:
    """Release a producer's connections now, not at garbage collection (brokers such as
    Tansu wait for open connections when they shut down). Producer.close is new in 2.x."""
    getattr(client, "close", lambda: None)()
