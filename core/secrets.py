"""Secrets never land in the log: every payload is redacted before it is appended.

What counts as a secret: the values of environment variables whose names look secret
(`*_API_KEY`, `*_TOKEN`, `*SECRET*`, `*PASSWORD*`, `*_ACCESS_KEY`, `*_PRIVATE_KEY`), the
values of the variables named in `LOOPSTREAM_SECRETS` (comma-separated names), and any
values a program passes explicitly (`extra`). Values shorter than 8 characters are
skipped (too likely to match ordinary text). Each occurrence in any string field of a
payload (nested ones too, e.g. a tool call's `arguments_json`) becomes `[REDACTED:NAME]`.

The same walk makes every string storable (lone surrogates become U+FFFD: UTF-8 cannot
hold them, and a model's JSON or a tool's output may contain them).

`runtime.inline.build_events`, the one place emitted events are built, applies it; the
state is folded from the log, so the model and the tools see the redacted text too.
One compiled regex of all secret values is cached per environment, so a payload with
no secret in it costs one `search` per string field.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel

MIN_SECRET_LEN = 8
SECRETS_ENV = "LOOPSTREAM_SECRETS"
SECRET_NAME = re.compile(
    r"(?:^|_)(?:API_KEY|TOKEN|ACCESS_KEY|PRIVATE_KEY)$|SECRET|PASSWORD|PASSWD", re.IGNORECASE
)

Secrets = Mapping[str, str] | Iterable[str]  # name -> value, or bare values (named SECRET)


def is_secret_name(name: str) -> bool:
    return SECRET_NAME.search(name) is not None


class Redactor:
    """Replaces each known secret value with `[REDACTED:NAME]`."""

    def __init__(self, named: Iterable[tuple[str, str]]) -> None:
        self.names: dict[str, str] = {}
        for name, value in named:
            if not value or len(value) < MIN_SECRET_LEN:
                continue
            # JSON-escaped spellings too: a secret inside arguments_json may be escaped.
            for variant in (value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]):
                self.names.setdefault(variant, name)
        # Longest first, so a secret that contains another is replaced whole.
        alternatives = sorted(self.names, key=len, reverse=True)
        self.rx = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def __bool__(self) -> bool:
        return self.rx is not None

    def text(self, value: str) -> str:
        if self.rx is None or self.rx.search(value) is None:
            return value
        return self.rx.sub(lambda m: f"[REDACTED:{self.names[m.group(0)]}]", value)

    def payload(self, model: BaseModel) -> Any:
        """`model` with every string field redacted (the same object when nothing matched)."""
        if self.rx is None:
            return model
        return self._value(model)

    def _value(self, value: Any) -> Any:
        return map_strings(value, self.text)


def map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """`value` with `fn` applied to every string in it (fields of pydantic models, lists and
    dict values, nested); the same object wherever nothing changed."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, BaseModel):
        changes = {}
        for name in type(value).model_fields:
            old = getattr(value, name)
            new = map_strings(old, fn)
            if new is not old:
                changes[name] = new
        return value.model_copy(update=changes) if changes else value
    if isinstance(value, list):
        items = [map_strings(v, fn) for v in value]
        return items if any(a is not b for a, b in zip(items, value)) else value
    if isinstance(value, dict):
        out = {k: map_strings(v, fn) for k, v in value.items()}
        return out if any(out[k] is not value[k] for k in value) else value
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(text: str) -> str:
    """`text` as UTF-8 can store it: surrogate pairs joined, lone surrogates (undecodable
    bytes, half an emoji in a JSON reply) replaced by U+FFFD."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def secret_values(environ: Mapping[str, str] | None = None, extra: Secrets = ()) -> list[tuple[str, str]]:
    """(name, value) of every secret: secret-looking env vars, LOOPSTREAM_SECRETS, `extra`."""
    env = os.environ if environ is None else environ
    listed = {n.strip() for n in env.get(SECRETS_ENV, "").split(",") if n.strip()}
    found = [(k, v) for k, v in env.items() if v and (k in listed or SECRET_NAME.search(k))]
    if isinstance(extra, Mapping):
        found += [(str(k), str(v)) for k, v in extra.items()]
    else:
        found += [("SECRET", str(v)) for v in extra]
    return found


_CACHE: dict[tuple, Redactor] = {}
_SECRET_KEYS: dict[object, bool] = {}  # raw env key -> does its name look secret


def _env_fingerprint() -> tuple:
    """The raw (undecoded) secret-looking items of os.environ plus the LOOPSTREAM_SECRETS
    ones: cheap to compute per event, and it changes whenever a secret does."""
    data = getattr(os.environ, "_data", None)
    if not isinstance(data, dict):  # not CPython's os.environ: the slow, decoded path
        return tuple(sorted(secret_values()))
    out = []
    for k, v in data.items():
        secret = _SECRET_KEYS.get(k)
        if secret is None:
            name = k.decode("utf-8", "surrogateescape") if isinstance(k, bytes) else k
            secret = _SECRET_KEYS[k] = bool(SECRET_NAME.search(name)) or name == SECRETS_ENV
        if secret:
            out.append((k, v))
    listed = os.environ.get(SECRETS_ENV)
    if listed:
        out += [(n, os.environ.get(n.strip())) for n in listed.split(",")]
    return tuple(out)


def current(extra: Secrets = ()) -> Redactor:
    """The redactor for the environment as it is now (plus `extra`), compiled once per change."""
    if not isinstance(extra, Mapping):
        extra = tuple(extra)  # a generator is read once
    extra_key = tuple(sorted(extra.items())) if isinstance(extra, Mapping) else extra
    key = (_env_fingerprint(), isinstance(extra, Mapping), extra_key)
    found = _CACHE.get(key)
    if found is None:
        if len(_CACHE) > 32:
            _CACHE.clear()
        found = _CACHE[key] = Redactor(secret_values(extra=extra))
    return found


def redact(payload: Any, extra: Secrets = ()) -> Any:
    """`payload` (a pydantic model) with every secret value replaced by `[REDACTED:NAME]`,
    and every string made storable (`storable`: a model or a tool may return invalid Unicode)."""
    return current(extra).payload(map_strings(payload, storable))
