"""`loopstream mcp-server`: loopstream as an MCP server (stdio), so another agent can delegate to a
loopstream agent. Its tools run the loopstream commands in a subprocess each (the same leases,
logs, agents and errors as a person typing them): run, status, replay, fork, sessions."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from loopstream.cli.common import DbOpt, UserError

TIMEOUT_S = 3600


def _loopstream(args: list[str], db: Path | None, timeout: float = TIMEOUT_S) -> str:
    """A loopstream command's output (stdout, then stderr's last lines when it failed)."""
    full = [sys.executable, "-m", "loopstream.cli.app", args[0], *(["--db", str(db)] if db else []), *args[1:]]
    try:
        done = subprocess.run(full, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"error: no answer within {timeout:g}s"
    if done.returncode == 0:
        return done.stdout.strip()
    tail = "\n".join(done.stderr.strip().splitlines()[-5:])
    return f"error (exit {done.returncode}): {tail or done.stdout.strip()}"


def mcp_server(
    db: DbOpt = None,
    agent: Annotated[Optional[str], typer.Option(show_default=False, help="The agent `run` uses when the caller names none (default: run's defaults).")] = None,
) -> None:
    """Serve loopstream over MCP (stdio): tools run, status, replay, fork and sessions (needs the [mcp] extra)."""
    try:
        from mcp.server.mcpserver import MCPServer
    except ImportError:
        raise UserError("loopstream mcp-server needs the mcp package: pip install 'loopstream[mcp]'") from None
    server = MCPServer("loopstream", instructions="Run loopstream agents; every step is in an event log.")
    default_agent = agent

    @server.tool()
    def run(goal: str, agent: str = "") -> str:
        """Run a loopstream agent on a goal until it answers; the answer, then the session id."""
        name = agent or default_agent
        out = _loopstream(["run", "-q", *(["--agent", name] if name else []), "--", goal], db)
        return out

    @server.tool()
    def status(session_id: str) -> str:
        """One session's events, as `loopstream show` prints them."""
        return _loopstream(["show", session_id], db, 120)

    @server.tool()
    def replay(session_id: str) -> str:
        """Replay a session from its log (no model or tool call) and verify it."""
        return _loopstream(["replay", session_id], db, 600)

    @server.tool()
    def fork(session_id: str, at: int, message: str = "") -> str:
        """Fork a session after event `at` (optionally with a new user message) and run the child."""
        out = _loopstream(["fork", session_id, "--at", str(at), "--yes",
                           *(["--message", message] if message else [])], db, 120)
        if out.startswith("error") or "→" not in out:
            return out
        child = out.split("→", 1)[1].split()[0]
        return _loopstream(["resume", "-q", child], db) + f"\nchild session {child}"

    @server.tool()
    def sessions() -> str:
        """The sessions of the log, newest last."""
        return _loopstream(["sessions"], db, 120)

    server.run()
