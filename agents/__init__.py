"""Composability: the project file (named agents), skills, plugins, hooks' configuration and
MCP servers; between the tools/processors and the runtime/cli (docs/composability.md)."""
