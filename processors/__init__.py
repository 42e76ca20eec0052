"""loopstream.processors."""
