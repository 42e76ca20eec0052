"""`loopstream mcp-server` as another MCP client meets it: a real stdio connection (our MCP
client, the `mcp` SDK) runs an agent of the project file, reads its status, replays and forks it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loopstream.agents.mcp import McpHub
from loopstream.agents.project import McpServer
from loopstream.tools.registry import ToolContext

pytest.importorskip("mcp")


def test_mcp_server_runs_an_agent_for_another_client(tmp_path: Path) -> None:
    (tmp_path / "loopstream.toml").write_text('[agents.adder]\nprovider = "scripted"\nmodel = "adder"\n'
                                              'tools = ["add"]\n')
    server = McpServer(command=[sys.executable, "-m", "loopstream.cli.app", "mcp-server", "--db",
                                str(tmp_path / "x.db")], env={"LOOPSTREAM_CONFIG_DIR": str(tmp_path / "none")},
                       timeout_s=120)
    ctx = ToolContext(workdir=tmp_path)
    with McpHub({"ls": server}, str(tmp_path)) as hub:
        tools = {t.name: t for t in hub.tools}
        assert {"ls__run", "ls__status", "ls__replay", "ls__fork", "ls__sessions"} <= set(tools)
        answer = tools["ls__run"].invoke({"goal": "add one", "agent": "adder"}, ctx)
        assert answer == "The result is 1.", answer
        listing = tools["ls__sessions"].invoke({}, ctx)
        sid = listing.splitlines()[1].split()[0]
        assert "done" in listing
        assert "SessionFinished" in tools["ls__status"].invoke({"session_id": sid}, ctx)
        assert "error" not in tools["ls__replay"].invoke({"session_id": sid}, ctx)[:10]
        forked = tools["ls__fork"].invoke({"session_id": sid, "at": 5}, ctx)
        assert "The result is 1." in forked and "child session" in forked
        bad = tools["ls__run"].invoke({"goal": "x", "agent": "ghost"}, ctx)
        assert bad.startswith("error (exit 2)") and "unknown agent 'ghost'" in bad
