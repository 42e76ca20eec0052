"""loopstream.tools."""
