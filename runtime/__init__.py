"""The in-process and worker drivers, the session writer, and assembly of processors."""
