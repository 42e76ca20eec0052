"""Read-only file tools, confined to the session's working directory (tools/confine.py)."""
from __future__ import annotations

import re

from loopstream.tools.confine import entries, read_bytes, walk_files
from loopstream.tools.registry import ToolContext, ToolError, tool

MAX_READ_BYTES = 64_000
MAX_MATCHES = 200
MAX_GREP_FILE_BYTES = 4_000_000  # grep reads at most this much of each file


@tool
def read_file(path: str, ctx: ToolContext, offset: int = 0, limit: int = MAX_READ_BYTES) -> str:
    """Read a text file (relative to the working directory). Large files: use offset/limit in bytes."""
    data = read_bytes(ctx, path, offset, max(0, min(limit, MAX_READ_BYTES)))
    return data.decode("utf-8", errors="replace")


@tool
def list_dir(ctx: ToolContext, path: str = ".") -> str:
    """List a directory (relative to the working directory); directories end with '/',
    symbolic links with '@' (not followed)."""
    marks = {"dir": "/", "link": "@"}
    return "\n".join(name + marks.get(kind, "") for name, kind in entries(ctx, path)) or "(empty)"


@tool
def grep(pattern: str, ctx: ToolContext, path: str = ".") -> str:
    """Search files under a path for a regular expression; prints file:line: text."""
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ToolError(f"bad regular expression {pattern!r}: {exc}", "invalid_arguments") from None
    hits: list[str] = []
    for rel, data in walk_files(ctx, path, MAX_GREP_FILE_BYTES):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if rx.search(line):
                hits.append(f"{rel}:{i}: {line[:200]}")
                if len(hits) >= MAX_MATCHES:
                    return "\n".join(hits + [f"(stopped after {MAX_MATCHES} matches)"])
    return "\n".join(hits) or "(no matches)"


TOOLS = [read_file, list_dir, grep]
