"""Tools the model can call: the `@tool` decorator, the registry, and the built-ins."""
from loopstream.tools.builtin import default_registry
from loopstream.tools.registry import Tool, ToolContext, ToolError, ToolRegistry, tool

__all__ = ["Tool", "ToolContext", "ToolError", "ToolRegistry", "default_registry", "tool"]
