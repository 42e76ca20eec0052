"""loopstream.replay."""
