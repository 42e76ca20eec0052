"""A tiny MCP server (the `mcp` SDK, pip install 'loopstream[mcp]'): one tool over stdio."""
from mcp.server.mcpserver import MCPServer

server = MCPServer("numbers")


@server.tool()
def square(n: int) -> int:
    """The square of an integer."""
    return n * n


if __name__ == "__main__":
    server.run()
