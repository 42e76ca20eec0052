"""loopstream.providers."""
