"""Configuration errors and the shared mapping of HTTP failures to ProviderError."""
from __future__ import annotations

import email.utils
import time

import httpx

from .base import ProviderError
from .interrupt import post


class ProviderConfigError(Exception):
    """The provider cannot be set up (missing key, bad option). One-line, user-facing message."""


class LocalModelError(ProviderConfigError):
    """The bundled local model or its runtime is missing or corrupt."""


# Worth retrying: rate limits, transient server failures, Anthropic's 529 "overloaded".
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait, from `retry-after-ms` (OpenAI), or `Retry-After` (seconds or HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _server_message(response: httpx.Response) -> str:
    """The error text a server put in its body, if any (OpenAI and Anthropic both use error.message)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("type") or "")[:300]
        if isinstance(err, str):
            return err[:300]
    return ""


def http_error(response: httpx.Response, *, server: str) -> ProviderError:
    """Map a non-2xx response to a ProviderError; `server` names it, e.g. "Anthropic API at URL"."""
    status = response.status_code
    detail = _server_message(response)
    suffix = f": {detail}" if detail else ""
    if status == 401:
        return ProviderError(f"{server} rejected the API key (401){suffix}", status=status, kind="auth")
    if status == 403:
        return ProviderError(f"{server} denied access (403){suffix}", status=status, kind="permission")
    if status == 404:
        return ProviderError(
            f"{server} returned 404 (unknown model or wrong base URL){suffix}", status=status, kind="not_found"
        )
    if status == 400 or status == 422:
        return ProviderError(f"{server} rejected the request ({status}){suffix}", status=status, kind="bad_request")
    if status == 429:
        return ProviderError(
            f"{server} is rate limiting (429){suffix}",
            retryable=True, status=status, retry_after=parse_retry_after(response.headers), kind="rate_limit",
        )
    retryable = status in RETRYABLE_STATUS or status >= 500
    kind = "overloaded" if status == 529 else ("server_error" if status >= 500 else "http_error")
    return ProviderError(
        f"{server} failed with HTTP {status}{suffix}",
        retryable=retryable, status=status, retry_after=parse_retry_after(response.headers), kind=kind,
    )


def transport_error(exc: httpx.HTTPError, *, server: str) -> ProviderError:
    """Timeouts and connection failures are always worth a retry."""
    if isinstance(exc, httpx.TimeoutException):
        return ProviderError(f"{server} timed out ({type(exc).__name__})", retryable=True, kind="timeout")
    return ProviderError(f"cannot reach {server}: {exc or type(exc).__name__}", retryable=True, kind="connection")


def post_json(client: httpx.Client, url: str, body: dict, *, server: str, timeout: float | None = None) -> dict:
    """POST `body` and return the JSON reply; every failure becomes a ProviderError, and a
    cancel of the current token (core/cancel.py) raises Interrupted at once.
    `timeout` (seconds) bounds this request over the client's own timeout."""
    try:
        if timeout is None:
            response = post(client, url, body)
        else:
            response = post(client, url, body, timeout=min(timeout, client.timeout.read or timeout))
    except httpx.HTTPError as exc:
        raise transport_error(exc, server=server) from exc
    if response.status_code >= 400:
        raise http_error(response, server=server)
    try:
        data = response.json()
    except ValueError as exc:
        raise unreadable(response.text, server) from exc
    if not isinstance(data, dict):
        raise unreadable(response.text, server)
    return data


def unreadable(text: str, server: str) -> ProviderError:
    return ProviderError(f"{server} sent an unreadable reply: {text[:200]!r}", retryable=True, kind="bad_response")
