"""`bench/bench_kafka.py` on the real broker (Tansu): sessions are counted by terminal status,
so a session that failed on its step budget is never counted as finished."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("confluent_kafka", reason="needs confluent-kafka")

pytestmark = pytest.mark.kafka
BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_kafka.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_kafka", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_counts_done_and_failed_sessions_apart(kafka_broker: str, tmp_path: Path) -> None:
    bench = load_bench()
    steps = 12  # above the default step budget of a session (12 model steps; adder:12 needs 13)
    ok = bench.run(kafka_broker, 3, steps, "inproc", 4, tmp_path)
    assert (ok["done"], ok["failed"]) == (3, 0), ok  # the budget is STEPS + 1 unless given
    short = bench.run(kafka_broker, 3, steps, "inproc", 4, tmp_path, max_steps=10)
    assert (short["done"], short["failed"]) == (0, 3), short
    assert short["sessions_per_s"] == 0
