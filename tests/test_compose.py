"""docker-compose.yml is valid (`docker compose config -q` when Docker Compose is installed)
and runs Apache Kafka in KRaft mode plus the three worker roles."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> list[str] | None:
    if shutil.which("docker"):
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if r.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_is_valid() -> None:
    cmd = _compose()
    if cmd is None:
        pytest.skip("Docker Compose is not installed")
    r = subprocess.run([*cmd, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_compose_services() -> None:
    """Kafka in KRaft mode and one service per worker role (a text check: no YAML parser needed)."""
    text = (ROOT / "docker-compose.yml").read_text()
    assert "image: apache/kafka:" in text
    assert "KAFKA_PROCESS_ROLES: broker,controller" in text
    for role in ("orchestrator", "model", "tool"):
        assert f'\n  {role}:' in text
        assert f'command: ["worker", "--role", "{role}", "--bus", "kafka://kafka:29092"' in text
    assert "condition: service_healthy" in text
    assert "pip install --no-cache-dir '.[kafka,local]'" in (ROOT / "Dockerfile").read_text()
