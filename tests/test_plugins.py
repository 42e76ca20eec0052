"""Plugins through a real entry point: the package in tests/fixtures/plugin_pkg is installed
with pip (into a private target folder, put on PYTHONPATH) and found through the
`loopstream.plugins` group; a broken one is reported and skipped."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loopstream.core.sqlite_log import SQLiteLog
from tests.test_project_file import cli

FIXTURE = Path(__file__).parent / "fixtures" / "plugin_pkg"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test plugin installed by pip into a folder of its own."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    src = build / "plugin_pkg"
    subprocess.run(["cp", "-r", str(FIXTURE), str(src)], check=True)  # pip builds in place: keep the tree clean
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert list(target.glob("loopstream_testplugin-*.dist-info/entry_points.txt"))
    return target


def test_plugins_lists_what_each_adds_and_the_broken_one(site: Path, tmp_path: Path) -> None:
    r = cli("plugins", cwd=tmp_path, env={"PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert "demo" in out and "loopstream_testplugin:plugin" in out and "loopstream-testplugin" in out
    assert "1 tools: shout" in out and "1 agents: plugged" in out and "1 processors: demo-counter" in out
    assert "1 providers: demo" in out and "1 hooks: PreToolUse" in out
    assert "broken" in out and "BROKEN, skipped: RuntimeError: this plugin is broken on purpose" in out


def test_a_plugin_agent_tool_skill_and_hook_run(site: Path, tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(site)}
    listed = cli("agents", cwd=tmp_path, env=env)
    assert listed.returncode == 0 and "plugged" in listed.stdout and "from the demo plugin" in listed.stdout
    assert "plugin broken" in listed.stderr and "skipped" in listed.stderr  # reported, not fatal
    r = cli("run", "--agent", "plugged", "--model", 'calls:shout:{"text": "hello"}', "--db", "x.db", "g",
            cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "HELLO!"
    log = SQLiteLog(tmp_path / "x.db")
    sid = log.sessions()[0].session_id
    started = log.read(sid, 0, 0)[0].payload
    assert started.tools == ["shout", "load_skill"] and "shouting: When and how to shout." in started.system_prompt
    assert json.loads(started.agent_json)["source"] == "plugin demo"
    assert json.loads(started.config_json)["hooks"][0]["python"] == "loopstream_testplugin:no_secrets"
    # The plugin's hook (a Python callable) denies, recorded as an event.
    r = cli("run", "--agent", "plugged", "--model", 'calls:shout:{"text": "my secret"}', "--db", "x.db", "g",
            cwd=tmp_path, env=env)
    assert r.returncode == 0 and "the demo plugin keeps secrets" in r.stdout
    sid = [s.session_id for s in log.sessions() if s.session_id != sid][0]
    assert "HookDecided" in [e.type for e in log.read(sid)]


def test_a_project_agent_overrides_a_plugin_agent(site: Path, tmp_path: Path) -> None:
    (tmp_path / "loopstream.toml").write_text('[agents.plugged]\ndescription = "mine now"\n')
    r = cli("agents", cwd=tmp_path, env={"PYTHONPATH": str(site)})
    assert "mine now" in r.stdout and "from the demo plugin" not in r.stdout


def test_without_plugins(tmp_path: Path) -> None:
    r = cli("plugins", cwd=tmp_path)
    assert r.returncode == 0


def test_a_plugin_provider_and_observer_are_wired_into_run(site: Path, tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(site)}
    r = cli("run", "--provider", "demo", "--model", "d2", "--tools", "add", "--db", "x.db", "hello", cwd=tmp_path,
            env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "demo model d2 read: hello"  # the plugin's provider answered
    log = SQLiteLog(tmp_path / "x.db")
    sid = log.sessions()[0].session_id
    started = log.read(sid, 0, 0)[0].payload
    assert (started.provider, started.model) == ("demo", "d2")
    # the plugin's observer saw the end, in-process
    assert (tmp_path / "demo-counter.log").read_text() == f"{sid} finished: demo model d2 read: hello\n"
    # a plugin never replaces a built-in provider name; an unknown one is a one-line error
    bad = cli("run", "--provider", "nosuch", "--db", "x.db", "g", cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_a_worker_uses_the_plugin_provider_and_observer(site: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPSTREAM_", "OPENAI_", "ANTHROPIC_"))}
    env.update(PYTHONPATH=str(site), LOOPSTREAM_CONFIG_DIR=str(tmp_path / "none"))
    with open(tmp_path / "worker.log", "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "loopstream.cli.app", "worker", "--db", "x.db",
                                   "--provider", "demo", "--model", "d3", "-q"], cwd=tmp_path, env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "worker " not in (tmp_path / "worker.log").read_text():
            assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.05)
        assert "demo-counter" in (tmp_path / "worker.log").read_text()  # the plugin's observer joined the worker
        r = cli("submit", "--db", "x.db", "--wait", "--timeout", "60", "hi", cwd=tmp_path,
                env={"PYTHONPATH": str(site)})
        assert r.returncode == 0 and r.stdout.strip() == "demo model d3 read: hi", r.stderr
        deadline = time.monotonic() + 30
        while not (tmp_path / "demo-counter.log").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "finished: demo model d3 read: hi" in (tmp_path / "demo-counter.log").read_text()
    finally:
        worker.terminate()
        worker.wait(30)


def test_a_plugin_provider_that_fails_is_one_line_and_never_replaces_a_built_in() -> None:
    from loopstream.providers.errors import ProviderConfigError
    from loopstream.runtime.assembly import open_model

    def broken(model):
        raise RuntimeError("no key")

    for made, message in ((broken, "failed to start: RuntimeError: no key"), (lambda m: 42, "not a provider")):
        with pytest.raises(ProviderConfigError, match=message), open_model("mine", "x", plugins={"mine": made}):
            pass
    with open_model("scripted", "adder", plugins={"scripted": broken}) as built:  # the built-in one
        assert built.name == "scripted"
