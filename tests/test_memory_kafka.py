"""Memory over the Kafka log (a real Tansu broker): the store is the local projection's file,
so what one session remembers is given to the next one started through the same log."""
from __future__ import annotations

import uuid

import pytest

pytest.importorskip("confluent_kafka", reason="needs confluent-kafka")

from loopstream.core import events as ev
from loopstream.core.memory import MemoryStore, log_file
from loopstream.kafka.log import KafkaLog
from loopstream.providers.scripted import ScriptedProvider
from loopstream.replay.determinism import check_determinism
from loopstream.runtime.assembly import build_runtime
from tests.test_memory import FACT, calls, config

pytestmark = pytest.mark.kafka


def test_remember_and_recall_over_kafka(kafka_broker, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LOOPSTREAM_USER", "ada")
    topic = f"mem.{uuid.uuid4().hex[:10]}.events"
    with KafkaLog(kafka_broker, topic=topic, projection_path=tmp_path / "projection.db", partitions=1) as log:
        assert log_file(log) == tmp_path / "projection.db"
        rt = build_runtime(log, ScriptedProvider(calls(("remember", {"text": FACT}), "ok")))
        a = rt.start_session("set up the deploy", config(tmp_path))
        assert rt.run_session(a).status == "done"
        rt = build_runtime(log, ScriptedProvider(calls("use ops/deploy.sh")))
        b = rt.start_session("how do I run the deploy script?", config(tmp_path))
        assert rt.run_session(b).status == "done"
        (recalled,) = [e.payload for e in log.read(b) if isinstance(e.payload, ev.MemoryRecalled)]
        assert FACT in recalled.text and len(recalled.memory_ids) == 1
        assert check_determinism(log, b).ok
        with MemoryStore(log_file(log), readonly=True) as store:
            assert [m.text for m in store.items()] == [FACT]
