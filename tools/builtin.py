"""The built-in tools as one registry."""
from __future__ import annotations

from loopstream.tools import arithmetic, delegate, files, memory, workspace
from loopstream.tools.registry import ToolRegistry


def default_registry(*, allow_writes: bool = False) -> ToolRegistry:
    """The built-in tools: arithmetic and read-only file tools; with `allow_writes`, also the
    side-effect tools write_file, edit_file and shell (loopstream.tools.workspace)."""
    registry = ToolRegistry().add(*arithmetic.TOOLS, *files.TOOLS)
    if allow_writes:
        registry.add(*workspace.TOOLS)
    return registry


def every_tool() -> ToolRegistry:
    """Every built-in tool, the side-effect, memory and delegation ones included: what a recorded
    session may name (fork and rollback ask it which calls were read-only)."""
    return default_registry(allow_writes=True).add(*memory.TOOLS, *delegate.TOOLS)
