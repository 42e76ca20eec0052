"""Start an agent from another system: produce a Goal, wait for its SessionUpdate result.

Uses only confluent-kafka and fastavro (no loopstream import): this is the whole contract.

    python examples/produce_goal.py --bootstrap localhost:9092 "What is 2 + 3? Use the add tool."

Needs loopstream workers on the same broker (`docker compose up`, or
`loopstream worker --role all --bus kafka://localhost:9092`). Options: --prefix (topic
prefix, default `loopstream`: goals go to `<prefix>.goals`, results come from
`<prefix>.results`), --key (idempotency key: the same key never starts a second session),
--progress (print per-step updates), --timeout.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
import uuid
from pathlib import Path

import fastavro
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas" / "contract"


def load(name: str, schema_dir: Path) -> dict:
    return fastavro.parse_schema(json.loads((schema_dir / f"{name}.avsc").read_text()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("goal")
    ap.add_argument("--bootstrap", default="localhost:9092")
    ap.add_argument("--prefix", default="loopstream")
    ap.add_argument("--agent", default="default")
    ap.add_argument("--key", default=None, help="idempotency key (default: random)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--schema-dir", type=Path, default=SCHEMAS)
    args = ap.parse_args()

    goal_schema, update_schema = load("goal", args.schema_dir), load("session_update", args.schema_dir)
    goals, results = f"{args.prefix}.goals", f"{args.prefix}.results"
    key = args.key or uuid.uuid4().hex
    correlation_id = uuid.uuid4().hex

    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    for topic in (goals, results):  # harmless if they exist (the workers create them too)
        for fut in admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)]).values():
            try:
                fut.result(30)
            except Exception:
                pass
    time.sleep(0.5)

    # Listen first, from the end of the results topic, so the answer cannot be missed.
    consumer = Consumer({
        "bootstrap.servers": args.bootstrap,
        # Partitions are assigned by hand below: the group is never joined, nothing is committed.
        "group.id": f"example-{correlation_id}",
        "enable.auto.commit": False,
        # With `?results=transactional` results come from Kafka transactions: skip aborted ones.
        "isolation.level": "read_committed",
    })
    parts = consumer.list_topics(results, timeout=30).topics[results].partitions
    consumer.assign([TopicPartition(results, p, consumer.get_watermark_offsets(
        TopicPartition(results, p), timeout=30, cached=False)[1]) for p in parts])

    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, goal_schema, {
        "goal": args.goal, "agent": args.agent, "idempotency_key": key, "correlation_id": correlation_id,
        "reply_topic": results, "progress": args.progress, "submitted_ms": int(time.time() * 1000),
    })
    producer = Producer({
        "bootstrap.servers": args.bootstrap,
        # Retries never write the goal twice (and acks=all: acknowledged = on every in-sync replica).
        # The idempotency key protects against a goal sent twice by this program itself.
        "enable.idempotence": True,
        "acks": "all",
    })
    producer.produce(goals, key=key.encode(), value=buf.getvalue())
    if producer.flush(30):
        print("the goal was not acknowledged", file=sys.stderr)
        return 1
    print(f"goal sent (idempotency key {key}, correlation id {correlation_id})", file=sys.stderr)

    seen: set[tuple[str, int]] = set()  # updates are at-least-once: keep the first per (session, seq)
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            update = fastavro.schemaless_reader(io.BytesIO(msg.value()), update_schema)
            if update["correlation_id"] != correlation_id:
                continue
            if (update["session_id"], update["seq"]) in seen:
                continue
            seen.add((update["session_id"], update["seq"]))
            if update["kind"] == "progress":
                print(f"  {update['seq']:>3} {update['event_type']:<16} {update['detail'] or ''}", file=sys.stderr)
                continue
            print(f"session {update['session_id']}: {update['status']}", file=sys.stderr)
            if update["status"] == "done":
                print(update["answer"])
                return 0
            print(update["error"], file=sys.stderr)
            return 1
    finally:
        consumer.close()
    print(f"no result within {args.timeout:.0f}s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
