"""The opt-in transactional results relay (`kafka://…?results=transactional`, kafka/relay.py)
on a real broker (Tansu): each result once for read_committed readers, across a restart.

The worker is always stopped gracefully (SIGTERM): Tansu never times out an open transaction,
so a relay killed mid-transaction would hold read_committed readers (see kafka/relay.py).
"""
from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from loopstream.kafka.contract import ContractError, parse_kafka_url, session_id_for

RESULT = "The result is 2."


def test_results_mode_in_the_url() -> None:
    assert parse_kafka_url("kafka://h:1").results == "direct"
    assert parse_kafka_url("kafka://h:1?prefix=p&results=transactional").results == "transactional"
    with pytest.raises(ContractError, match="results mode"):
        parse_kafka_url("kafka://h:1?results=sometimes")


def read_results(broker: str, topic: str, isolation: str) -> list:
    from confluent_kafka import Consumer, TopicPartition

    from loopstream.kafka.contract import decode_update

    c = Consumer({"bootstrap.servers": broker, "group.id": f"test-{uuid.uuid4().hex}",
                  "enable.auto.commit": False, "isolation.level": isolation})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out = []
        deadline = time.monotonic() + 30
        quiet_until = time.monotonic() + 2  # read until nothing new arrives for 2 s
        while time.monotonic() < min(deadline, quiet_until):
            m = c.poll(0.2)
            if m is None or m.error() is not None:
                continue
            out.append(decode_update(m.value()))
            quiet_until = time.monotonic() + 2
        return out
    finally:
        c.close()


def committed_offsets(broker: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition of `topic` (partitions without one left out)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": broker, "group.id": group, "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        got = c.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        return {tp.partition: tp.offset for tp in got if tp.offset >= 0}
    finally:
        c.close()


def committed(broker: str, group: str, topic: str) -> int:
    return sum(committed_offsets(broker, group, topic).values())


def submit_many(bus: str, keys: list[str], cwd: Path) -> None:
    from tests.test_kafka_workers import env_for

    procs = [subprocess.Popen([sys.executable, "-m", "loopstream.cli.app", "submit", "--bus", bus, "--wait",
                               "--timeout", "90", "--idempotency-key", k, f"count ({k})"],
                              cwd=cwd, env=env_for(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in keys]
    for k, p in zip(keys, procs):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == RESULT, (k, out, err)


@pytest.mark.kafka
def test_transactional_results_exactly_once_across_a_restart(kafka_broker: str, tmp_path: Path) -> None:
    pytest.importorskip("confluent_kafka", reason="needs confluent-kafka")
    from tests.test_kafka_workers import Workers, bus_url

    prefix = "tx" + uuid.uuid4().hex[:6]
    bus = bus_url(kafka_broker, prefix) + "&results=transactional"
    results_topic, events_topic = f"{prefix}.results", f"{prefix}.events"
    workers = Workers(bus, tmp_path)
    keys = [f"tx-{i}-{uuid.uuid4().hex[:6]}" for i in range(4)]
    more = [f"tx-after-{uuid.uuid4().hex[:6]}"]
    try:
        workers.start("all")
        submit_many(bus, keys, tmp_path)
        assert committed(kafka_broker, f"{prefix}.results", events_topic) > 0, workers.logs()  # the relay ran

        first = read_results(kafka_broker, results_topic, "read_committed")
        counts = Counter(u.session_id for u in first if u.kind == "result")
        assert counts == Counter({session_id_for(k): 1 for k in keys}), (counts, workers.logs())
        assert {u.status for u in first} == {"done"} and {u.answer for u in first} == {RESULT}

        # Stop gracefully (the relay finishes its transaction), start again: the relay
        # resumes from the offsets committed in its transactions and republishes nothing.
        codes = workers.stop_all()
        assert all(c == 0 for c in codes.values()), (codes, workers.logs())
        workers.start("all")
        submit_many(bus, more, tmp_path)  # and the restarted relay publishes new results
    finally:
        codes = workers.stop_all()
    assert all(c == 0 for c in codes.values() if c is not None), (codes, workers.logs())

    after = read_results(kafka_broker, results_topic, "read_committed")
    counts = Counter(u.session_id for u in after if u.kind == "result")
    assert counts == Counter({session_id_for(k): 1 for k in keys + more}), (counts, workers.logs())
    # Partitions interleave differently on each read: compare each session's own sequence.
    def by_session(updates: list) -> dict:
        out: dict = {}
        for u in updates:
            out.setdefault(u.session_id, []).append(u)
        return out

    before = by_session(first)
    assert {s: us for s, us in by_session(after).items() if s in before} == before
    assert "results relay" not in workers.logs(), workers.logs()  # no aborted transaction, no error


@pytest.mark.kafka
def test_relay_publishes_accepted_results_only(kafka_broker: str) -> None:
    """In process: a losing racer's SessionFinished (dropped by the acceptance rule) and a
    session not started from a goal publish nothing; a second run republishes nothing."""
    pytest.importorskip("confluent_kafka", reason="needs confluent-kafka")
    from loopstream.core.events import GoalReceived, SessionFinished
    from loopstream.kafka.log import DROPPED, KafkaLog
    from loopstream.kafka.relay import TransactionalResultsRelay
    from tests.log_conformance import event
    from tests.test_log_kafka import FAST_GROUPS

    prefix = "tr" + uuid.uuid4().hex[:6]
    topic, reply, group = f"{prefix}.events", f"{prefix}.results", f"{prefix}.results"
    key = "k-" + uuid.uuid4().hex[:8]
    s, other = session_id_for(key), "s-" + uuid.uuid4().hex[:12]

    def finished(sid: str, answer: str):
        return event(sid, 1, payload=SessionFinished(answer=answer, steps=1, input_tokens=0, output_tokens=0))

    winner = KafkaLog(kafka_broker, topic=topic, consumer_config=FAST_GROUPS)
    loser = KafkaLog(kafka_broker, topic=topic, consumer_config=FAST_GROUPS)
    try:
        winner.append(s, [event(s, 0, payload=GoalReceived(text="g", idempotency_key=key, reply_topic=reply))], 0)
        winner.append(s, [finished(s, "winner")], 1)
        offsets = loser._produce(s, [finished(s, "loser")])  # a racer that lost: dropped
        loser.catch_up(until={loser.partition(s): offsets[-1] + 1})
        assert loser.projection.verdict(loser.partition(s), offsets[0]) == (DROPPED, "conflict")
        winner.append(other, [event(other, 0)], 0)  # no idempotency key / reply topic
        winner.append(other, [finished(other, "not a goal")], 1)

        relay = TransactionalResultsRelay(kafka_broker, winner, group, poll_timeout=0.1)
        deadline = time.monotonic() + 30
        relay.run(until=lambda: relay.stats["deliveries"] >= 4 or time.monotonic() > deadline)
        assert relay.stats["deliveries"] == 4 and relay.stats["results"] == 1, relay.stats
        assert relay.stats["aborts"] == 0
        # The group's position is past every delivery. Tansu drops the offsets of a transaction
        # that produced nothing (unless it is the producer's first): the relay commits such a
        # batch without a transaction (kafka/relay.py); checked here whatever the partitions.
        assert committed_offsets(kafka_broker, group, topic) == winner.projection.accepted_ends(), relay.stats

        # A new session after the first run: the second run relays it, and nothing older.
        key2 = "k-" + uuid.uuid4().hex[:8]
        s2 = session_id_for(key2)
        winner.append(s2, [event(s2, 0, payload=GoalReceived(text="g", idempotency_key=key2, reply_topic=reply))], 0)
        winner.append(s2, [finished(s2, "second")], 1)
        again = TransactionalResultsRelay(kafka_broker, winner, group, poll_timeout=0.1)
        deadline = time.monotonic() + 30
        again.run(until=lambda: again.stats["deliveries"] >= 2 or time.monotonic() > deadline)
        assert again.stats["deliveries"] == 2 and again.stats["results"] == 1, again.stats
    finally:
        winner.close()
        loser.close()
    got = read_results(kafka_broker, reply, "read_committed")
    assert sorted((u.session_id, u.seq, u.answer, u.kind, u.status) for u in got) == sorted(
        [(s, 1, "winner", "result", "done"), (s2, 1, "second", "result", "done")])
