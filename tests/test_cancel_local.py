"""Cancel stops the real local model: a long llama.cpp generation (up to 4096 tokens, minutes
on a small machine) is cancelled and the server is free again promptly, for the in-process
server and for the shared one `loopstream run` uses. Bounds are generous: they prove the
generation stopped (it would go on for minutes), they are not performance figures."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from loopstream.core import events as ev
from loopstream.core.sampling import Sampling
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.providers.base import Message
from loopstream.providers.local import MODEL_NAME, local_provider
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig
from loopstream.runtime.writer import SessionWriter
from tests.test_cancel import cancel_from_another_process, cli, wait_for
from tests.test_local_shared import llama_servers

pytestmark = [pytest.mark.local, pytest.mark.slow]

STORYTELLER = "You are a storyteller. You write long, detailed stories."
STORY = "Write a very long story, at least 3000 words, about a lighthouse keeper and the sea."


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy(pid: int, window: float = 2.0) -> float:
    """The cores `pid` used over `window` seconds."""
    before = cpu_seconds(pid)
    time.sleep(window)
    return (cpu_seconds(pid) - before) / window


def test_a_cancelled_session_frees_the_in_process_llama_server(tmp_path: Path, local_server: Any) -> None:
    provider = local_provider(local_server, action_mode="native")
    log = SQLiteLog(tmp_path / "l.db")
    runtime = build_runtime(log, provider)
    config = SessionConfig(provider="local", model=MODEL_NAME, tools=[], system_prompt=STORYTELLER,
                           sampling=Sampling(max_output_tokens=4096))
    sid = runtime.start_session(STORY, config)
    ended: dict[str, Any] = {}
    driver = threading.Thread(target=lambda: ended.update(state=runtime.run_session(sid), at=time.monotonic()))
    driver.start()
    time.sleep(5)  # the generation is under way
    other = SQLiteLog(tmp_path / "l.db")
    SessionWriter(other).record(sid, [ev.SessionCancelled(reason="too long")], actor="person:ada")
    cancelled_at = time.monotonic()
    driver.join(120)
    assert ended["state"].status == "cancelled"
    assert ended["at"] - cancelled_at < 30
    started = time.monotonic()
    tiny = provider.complete([Message(role="user", content="Say OK.")], [], Sampling(max_output_tokens=8))
    assert tiny.text and time.monotonic() - started < 60, "the server still generated the cancelled story"
    assert [e.type for e in other.read(sid)][-2:] == ["ModelRequested", "SessionCancelled"]
    provider.close()


def test_run_cancelled_from_another_terminal_stops_the_shared_local_server(tmp_path: Path, local_cache: Path) -> None:
    env = {"LOOPSTREAM_CACHE_DIR": str(local_cache)}
    prompt = tmp_path / "storyteller.txt"
    prompt.write_text(STORYTELLER)
    run = cli("run", "--db", "l.db", "--tools", "add", "--action-mode", "native", "--system-prompt", str(prompt),
              "--max-output-tokens", "4096", STORY, cwd=tmp_path, env=env)
    servers = wait_for(lambda: llama_servers(local_cache), 120)
    assert servers and len(servers) == 1, f"not one shared local server: {servers}"
    (server,) = servers
    time.sleep(8)  # the model call is in flight and generating
    assert busy(server) > 0.3, "the server is not generating: nothing to cancel"
    err, after = cancel_from_another_process(tmp_path, run)
    assert run.returncode == 1 and "was cancelled by person:" in err, err
    assert after < 15, f"run exited {after:.1f}s after the cancel"
    assert wait_for(lambda: busy(server) < 0.1, 30), "the shared server kept generating the cancelled story"
    started = time.monotonic()
    tiny = subprocess.run([sys.executable, "-m", "loopstream.cli", "run", "--db", "l.db", "--tools", "add",
                           "--max-output-tokens", "64", "--max-steps", "1", "Say OK."],
                          cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert tiny.returncode in (0, 1), tiny.stderr  # the small model's answer does not matter, its turn does
    assert time.monotonic() - started < 90, "a second run waited for the cancelled generation"
