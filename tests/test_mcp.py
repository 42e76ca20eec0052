"""MCP servers' tools against a real server written with the `mcp` SDK (tests/mcp_calc_server.py),
over stdio and over streamable HTTP on 127.0.0.1: the tools are exposed to the model, each call
is a tool event (hooks apply to it), and a replay never starts the server."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from loopstream.agents.mcp import McpError, McpHub
from loopstream.agents.project import McpServer
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.tools.registry import ToolContext, ToolError
from tests.helpers import wait_for
from tests.test_project_file import cli

pytest.importorskip("mcp")
SERVER = Path(__file__).parent / "mcp_calc_server.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def http_server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SERVER), "http", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            return False

    try:
        assert wait_for(up, 60), "the MCP HTTP server did not start"
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(10)


def agent_file(tmp_path: Path, server: str, hook: str = "") -> None:
    (tmp_path / "loopstream.toml").write_text(
        f'[agents.m]\nprovider = "scripted"\ntools = []\nmcp_servers = ["calc"]\n{hook}\n[mcp_servers.calc]\n{server}\n')


def test_stdio_server_tools_are_called_recorded_and_replayed_without_it(tmp_path: Path) -> None:
    (tmp_path / "server.py").write_text(SERVER.read_text())
    agent_file(tmp_path, f'command = ["{sys.executable}", "server.py"]\ntimeout_s = 60')
    r = cli("run", "--agent", "m", "--model", 'calls:calc__multiply:{"a": 6, "b": 7}', "--db", "x.db", "g",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "42"
    log = SQLiteLog(tmp_path / "x.db")
    sid = log.sessions()[0].session_id
    events = log.read(sid)
    assert events[0].payload.tools == ["calc__multiply", "calc__explode"]
    done = next(e.payload for e in events if e.type == "ToolCompleted")
    assert (done.name, done.result) == ("calc__multiply", "42")
    # A fork before the call, resumed: the recorded servers are started again for the redo.
    assert cli("fork", sid, "--at", "4", "--yes", "--db", "x.db", cwd=tmp_path).returncode == 0  # an MCP call: a side effect
    child = [s.session_id for s in log.sessions() if s.session_id != sid][0]
    resumed = cli("resume", child, "--db", "x.db", cwd=tmp_path)
    assert resumed.returncode == 0 and resumed.stdout.strip() == "42", resumed.stderr
    (tmp_path / "server.py").unlink()  # a replay never starts the server
    assert cli("replay", sid, "--db", "x.db", cwd=tmp_path).returncode == 0


def test_http_server_tools_and_a_hook_on_them(tmp_path: Path, http_server: str) -> None:
    hook = ('[[agents.m.hooks]]\nevent = "PreToolUse"\nmatcher = "calc__*"\npython = "nobig:hook"\n')
    (tmp_path / "nobig.py").write_text(
        "def hook(data):\n    if data['tool_input'].get('a', 0) > 100:\n"
        "        return {'decision': 'deny', 'reason': 'too big'}\n")
    agent_file(tmp_path, f'url = "{http_server}"', hook)
    env = {"PYTHONPATH": str(tmp_path)}
    r = cli("run", "--agent", "m", "--model", 'calls:calc__multiply:{"a": 3, "b": 5}', "--db", "x.db", "g",
            cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "15", r.stderr
    r = cli("run", "--agent", "m", "--model", 'calls:calc__multiply:{"a": 300, "b": 5}', "--db", "x.db", "g",
            cwd=tmp_path, env=env)
    assert r.returncode == 0 and "too big" in r.stdout


def test_hub_errors_and_tool_errors(http_server: str) -> None:
    with McpHub({"calc": McpServer(url=http_server)}) as hub:
        tools = {t.name: t for t in hub.tools}
        ctx = ToolContext(workdir=Path("."))
        assert tools["calc__multiply"].invoke({"a": 2, "b": 4}, ctx) == "8"
        with pytest.raises(ToolError, match="invalid arguments"):
            tools["calc__multiply"].invoke({"a": "x"}, ctx)
        with pytest.raises(ToolError, match="no such luck") as caught:
            tools["calc__explode"].invoke({"reason": "no such luck"}, ctx)
        assert caught.value.kind == "mcp_tool_error"
        assert tools["calc__multiply"].spec().parameters["required"] == ["a", "b"]
    with pytest.raises(McpError, match=r"MCP server gone \(http://127.0.0.1:"):
        with McpHub({"gone": McpServer(url=f"http://127.0.0.1:{free_port()}/mcp", timeout_s=20)}):
            pass


def test_a_server_that_cannot_start_is_one_line(tmp_path: Path) -> None:
    agent_file(tmp_path, 'command = ["/nonexistent/server"]')
    r = cli("run", "--agent", "m", "--model", "adder", "g", cwd=tmp_path, env={"PATH": os.environ["PATH"]})
    assert r.returncode == 2 and "MCP server calc (/nonexistent/server)" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
