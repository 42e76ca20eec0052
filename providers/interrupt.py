"""HTTP calls a driver can interrupt (core/cancel.py): every adapter's requests go through here.

`post` runs the request in a helper thread (`cancel.run_in_thread`), so the caller gets
`Interrupted` as soon as the current token is cancelled, whatever phase the request is in
(resolving, connecting, waiting for the first byte). `interruptible(client)`, which every
adapter applies to its client, makes the connection drop too: while a request reads or
writes, its socket is registered with the current token, and cancelling shuts the socket
down, so the server sees the client go (llama.cpp then stops generating) and the helper
thread ends instead of waiting out a long generation.
"""
from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx

from loopstream.core import cancel


def post(client: httpx.Client, url: str, body: dict, **kwargs: Any) -> httpx.Response:
    """`client.post(url, json=body, **kwargs)`, interrupted by the current token (`Interrupted`)."""
    return cancel.run_in_thread(lambda: client.post(url, json=body, **kwargs), name="loopstream-http")


def interruptible(client: httpx.Client) -> httpx.Client:
    """`client` as httpx built it (its transport, environment proxies, pool and keep-alive),
    with the sockets of its connection pools shut down when the token of the call using
    them is cancelled. A transport without an httpcore pool (a test's MockTransport) is left
    as it is: its calls still return at once on a cancel (`post`)."""
    for transport in [client._transport, *client._mounts.values()]:  # httpx has no public option for this
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is None or isinstance(backend, _Backend):
            continue
        pool._network_backend = _Backend(backend)  # httpcore's pools take any NetworkBackend
    return client


class _Backend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self.inner = inner

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _Stream(self.inner.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _Stream(self.inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


class _Stream(httpcore.NetworkStream):
    """A connection whose reads and writes stop when the current token is cancelled."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self.inner = inner
        self.sock: socket.socket | None = inner.get_extra_info("socket")

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with self._stoppable():
            return self.inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with self._stoppable():
            self.inner.write(buffer, timeout)

    def close(self) -> None:
        self.inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        with self._stoppable():
            return _Stream(self.inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)

    @contextmanager
    def _stoppable(self) -> Iterator[None]:
        token = cancel.current()
        if token is cancel.NEVER or self.sock is None:
            yield
            return
        unregister = token.on_cancel(self._shutdown)
        try:
            yield
        finally:
            unregister()

    def _shutdown(self) -> None:
        """Wake a blocked read and send the server a FIN (close() alone does neither while
        another thread is in recv). The base class's shutdown, so a TLS socket keeps its
        SSL object for the reader that is still using it."""
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # type: ignore[arg-type]
        except OSError:
            pass  # already closed
