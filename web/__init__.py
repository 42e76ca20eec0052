"""The web inspector and the HTTP API beneath it (`loopstream ui`, docs/inspector.md).

It reads the same log as the CLI and writes only through the session writer
(runtime/writer.py, runtime/decisions.py, replay/fork.py). Needs the `[ui]` extra."""
