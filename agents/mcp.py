"""MCP servers' tools (the `mcp` SDK, the `[mcp]` extra): a `McpHub` connects to an agent's
servers (stdio: a process it starts; streamable HTTP: a loopback URL), lists their tools and
exposes each as a loopstream tool named `SERVER__TOOL` (providers allow only [A-Za-z0-9_-] in a
tool name, so not `server.tool`). A call goes through the tool processor like any tool
(permissions, hooks, timeouts), and its result is a ToolCompleted event: a replay never starts
a server. The servers run while the hub is open (the run); one background event loop serves them.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import jsonschema
from pydantic import ConfigDict, create_model

from loopstream.agents.project import McpServer
from loopstream.providers.base import ToolSpec
from loopstream.tools.registry import Tool, ToolContext, ToolError

SEPARATOR = "__"
_ANY_ARGS = create_model("mcp_args", __config__=ConfigDict(extra="allow"))


class McpError(RuntimeError):
    """A server that cannot be started, reached or listed: one line naming it."""


@dataclass
class McpTool(Tool):
    """A tool of an MCP server: its input schema as the server gave it, validated with jsonschema."""

    schema: dict[str, Any] | None = None

    def spec(self) -> ToolSpec:
        return ToolSpec(name=self.name, description=self.description,
                        parameters=self.schema or {"type": "object", "properties": {}})

    def invoke(self, arguments: dict[str, Any], ctx: ToolContext) -> str:
        if self.schema:
            try:
                jsonschema.validate(arguments, self.schema)
            except jsonschema.ValidationError as exc:
                raise ToolError(f"invalid arguments for {self.name}: {exc.message}", "invalid_arguments") from None
        return self.fn(**arguments)


def _text(result: Any) -> str:
    parts = []
    for item in getattr(result, "content", None) or []:
        text = getattr(item, "text", None)
        parts.append(text if isinstance(text, str) else json.dumps(item.model_dump(mode="json"), sort_keys=True))
    if not parts and getattr(result, "structured_content", None) is not None:
        parts.append(json.dumps(result.structured_content, sort_keys=True))
    return "\n".join(parts)


class McpHub:
    """The connections to some MCP servers, open while the hub is (a context manager)."""

    def __init__(self, servers: Mapping[str, McpServer], cwd: str | None = None) -> None:
        self.servers = dict(servers)
        self.cwd = cwd
        self.tools: list[McpTool] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: list[asyncio.Future] = []

    def __enter__(self) -> McpHub:
        if not self.servers:
            return self
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="loopstream-mcp")
        self._thread.start()
        try:
            self._stop = self._await(self._make_stop(), 5)
            for name, server in self.servers.items():
                self.tools += self._connect(name, server)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _make_stop(self) -> asyncio.Event:
        return asyncio.Event()

    def _await(self, coro: Any, timeout: float) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _connect(self, name: str, server: McpServer) -> list[McpTool]:
        assert self._loop is not None
        ready: asyncio.Future = self._await(self._future(), 5)
        self._tasks.append(asyncio.run_coroutine_threadsafe(self._serve(server, ready), self._loop))
        what = " ".join(server.command) if server.command else server.url
        try:
            session, listed = asyncio.run_coroutine_threadsafe(self._wait(ready), self._loop).result(server.timeout_s)
        except TimeoutError:
            raise McpError(f"MCP server {name} ({what}): no answer within {server.timeout_s:g}s") from None
        except Exception as exc:
            raise McpError(f"MCP server {name} ({what}): {_reason(exc)}") from None
        return [self._tool(name, server, session, t) for t in listed]

    async def _future(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    @staticmethod
    async def _wait(ready: asyncio.Future) -> Any:
        return await ready

    async def _serve(self, server: McpServer, ready: asyncio.Future) -> None:
        from mcp.client.session import ClientSession  # the [mcp] extra: imported when a server is configured
        from mcp.client.stdio import StdioServerParameters, stdio_client
        from mcp.client.streamable_http import streamable_http_client
        try:
            async with AsyncExitStack() as stack:
                if server.command:
                    params = StdioServerParameters(command=server.command[0], args=server.command[1:],
                                                   env=server.env or None, cwd=self.cwd)
                    errlog = stack.enter_context(open(os.devnull, "w"))  # the server's own logging: not ours
                    streams = await stack.enter_async_context(stdio_client(params, errlog=errlog))
                else:
                    streams = await stack.enter_async_context(streamable_http_client(server.url))
                session = await stack.enter_async_context(ClientSession(streams[0], streams[1]))
                await session.initialize()
                listed = await session.list_tools()
                ready.set_result((session, listed.tools))
                assert self._stop is not None
                await self._stop.wait()
        except BaseException as exc:  # reported to the waiting thread
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))

    def _tool(self, server_name: str, server: McpServer, session: Any, spec: Any) -> McpTool:
        remote = spec.name
        name = re.sub(r"[^A-Za-z0-9_-]", "_", f"{server_name}{SEPARATOR}{remote}")[:64]

        def call(**arguments: Any) -> str:
            try:
                result = self._await(session.call_tool(remote, arguments), server.timeout_s)
            except TimeoutError:
                raise ToolError(f"{name}: the MCP server did not answer within {server.timeout_s:g}s",
                                "timeout") from None
            except Exception as exc:
                raise ToolError(f"{name}: {_reason(exc)}", "mcp_error") from None
            text = _text(result)
            if getattr(result, "is_error", False):
                raise ToolError(text or f"{name} failed", "mcp_tool_error")
            return text

        description = f"[MCP {server_name}] {spec.description or remote}"
        # read_only: it does not touch the workdir (no checkpoint); not idempotent: never re-run after a crash
        return McpTool(name, description, call, _ANY_ARGS, read_only=True, idempotent=False,
                       timeout_s=server.timeout_s, schema=dict(spec.input_schema or {}))

    def close(self) -> None:
        """Stop every connection (stdio servers exit), then the loop."""
        loop = self._loop
        if loop is None:
            return
        if self._stop is not None:
            loop.call_soon_threadsafe(self._stop.set)
        for task in self._tasks:
            try:
                task.result(10)
            except Exception:  # a server that died already
                pass
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None


def _reason(exc: BaseException) -> str:
    """An exception (maybe a group of them, as anyio raises) as one short line."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
