"""A real MCP server for the tests, written with the `mcp` SDK's server side (MCPServer):
`python tests/mcp_calc_server.py` serves stdio; `... http PORT` serves streamable HTTP on 127.0.0.1."""
from __future__ import annotations

import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("calc")


@server.tool()
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


@server.tool()
def explode(reason: str) -> str:
    """Always fails with the reason."""
    raise ToolError(reason)


if __name__ == "__main__":
    if sys.argv[1:2] == ["http"]:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
