"""Read-only file tools, confined to the session's working directory."""
from __future__ import annotations

import os
import re
from pathlib import Path

from loopstream.tools.registry import ToolContext, ToolError, tool

MAX_READ_BYTES = 64_000
MAX_MATCHES = 200


def confine(ctx: ToolContext, path: str) -> Path:
    """Resolve `path` inside the working directory; refuse anything that escapes it."""
    root = ctx.workdir.resolve()
    target = (root / path).resolve()
    if target != root and root not in target.parents:
        raise ToolError(f"path {path!r} is outside the working directory", "permission_denied")
    return target


@tool
def read_file(path: str, ctx: ToolContext, offset: int = 0, limit: int = MAX_READ_BYTES) -> str:
    """Read a text file (relative to the working directory). Large files: use offset/limit in bytes."""
    target = confine(ctx, path)
    if not target.is_file():
        raise ToolError(f"no such file: {path}", "not_found")
    with target.open("rb") as f:
        f.seek(max(0, offset))
        data = f.read(max(0, min(limit, MAX_READ_BYTES)))
    return data.decode("utf-8", errors="replace")


@tool
def list_dir(ctx: ToolContext, path: str = ".") -> str:
    """List a directory (relative to the working directory); directories end with '/'."""
    target = confine(ctx, path)
    if not target.is_dir():
        raise ToolError(f"no such directory: {path}", "not_found")
    entries = sorted(target.iterdir(), key=lambda p: p.name)
    return "\n".join(p.name + ("/" if p.is_dir() else "") for p in entries) or "(empty)"


@tool
def grep(pattern: str, ctx: ToolContext, path: str = ".") -> str:
    """Search files under a path for a regular expression; prints file:line: text."""
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ToolError(f"bad regular expression {pattern!r}: {exc}", "invalid_arguments") from None
    root = confine(ctx, path)
    base = ctx.workdir.resolve()
    files = [root] if root.is_file() else sorted(_walk(root))
    hits: list[str] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if rx.search(line):
                hits.append(f"{f.relative_to(base)}:{i}: {line[:200]}")
                if len(hits) >= MAX_MATCHES:
                    return "\n".join(hits + [f"(stopped after {MAX_MATCHES} matches)"])
    return "\n".join(hits) or "(no matches)"


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            yield Path(dirpath) / name


TOOLS = [read_file, list_dir, grep]
