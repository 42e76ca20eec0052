"""Running the app: one uvicorn server on a socket bound here (so a taken port is one line,
and port 0 picks a free one), in the foreground (`loopstream ui`) or in a thread (tests)."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn


class ServeError(OSError):
    """The address cannot be bound (one line)."""


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def server_for(app, log_level: str = "warning") -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=2))


@dataclass
class Running:
    """A server running in a thread; `stop()` ends it."""

    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 10.0) -> Running:
    sock = bind(host, port)
    server = server_for(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="loopstream-ui")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ServeError("the server did not start")
        time.sleep(0.01)
    return Running(server, thread, url_of(sock))
