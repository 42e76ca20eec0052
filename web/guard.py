"""Who may talk to the server: loopback by default; on any other address only with a token.

Every request is checked before it reaches a route (`Guard`, an ASGI middleware):
- the Host header must name the loopback address the server is bound to (a page of another
  site that a DNS name re-pointed at 127.0.0.1 is refused), when bound to loopback;
- `/api/` needs `Authorization: Bearer TOKEN` when the server has a token (constant-time compare);
- a request that changes something (not GET/HEAD) must be JSON (`Content-Type: application/json`,
  which a cross-site form cannot send) and, if it has an Origin, come from this server's own."""
from __future__ import annotations

import hmac
import ipaddress
import json

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
MIN_TOKEN = 16


class BindError(ValueError):
    """The server must not start as asked (one line)."""


def is_loopback(host: str) -> bool:
    if host.strip("[]") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback address without a token, and a token too short to guess at."""
    if token is not None and len(token) < MIN_TOKEN:
        raise BindError(f"the token must be at least {MIN_TOKEN} characters")
    if not is_loopback(host) and not token:
        raise BindError(f"--host {host} is not a loopback address: the API would be open to the network; "
                        "set a token (--token or LOOPSTREAM_UI_TOKEN) or bind to 127.0.0.1")


def _host_only(header: str) -> str:
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    def __init__(self, app, *, loopback: bool, token: str | None) -> None:
        self.app = app
        self.loopback = loopback
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refused = self.refuse(scope)
            if refused is not None:
                status, message = refused
                body = json.dumps({"error": message, "status": status}).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                if status == 401:
                    headers.append((b"www-authenticate", b'Bearer realm="loopstream"'))
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def refuse(self, scope) -> tuple[int, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.loopback and _host_only(host) not in LOOPBACK_NAMES:
            return 421, f"host {host!r} is not this loopback server"
        path = scope.get("path", "")
        if self.token is not None and path.startswith("/api/"):
            given = headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode("latin-1"), self.token):
                return 401, "a valid token is required (Authorization: Bearer TOKEN)"
        if scope.get("method") not in ("GET", "HEAD"):
            if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                return 415, "send JSON (Content-Type: application/json)"
            origin = headers.get("origin")
            scheme = scope.get("scheme", "http")
            if origin is not None and origin.lower() != f"{scheme}://{host}".lower():
                return 403, f"origin {origin!r} may not change this server's sessions"
        return None
