"""The built-in tools as one registry."""
from __future__ import annotations

from loopstream.tools import arithmetic, files, workspace
from loopstream.tools.registry import ToolRegistry


def default_registry(*, allow_writes: bool = False) -> ToolRegistry:
    """The built-in tools: arithmetic and read-only file tools; with `allow_writes`, also the
    side-effect tools write_file, edit_file and shell (loopstream.tools.workspace)."""
    registry = ToolRegistry().add(*arithmetic.TOOLS, *files.TOOLS)
    if allow_writes:
        registry.add(*workspace.TOOLS)
    return registry
