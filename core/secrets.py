"""What reaches the log is safe to keep: every payload passes `sanitize` before it is
appended (the session writer, `runtime/writer.py`, the one place events are built): secrets are redacted, every text field is
capped, and text that UTF-8 cannot carry is repaired.

Secrets, each occurrence in any string field (nested ones too, e.g. a tool call's
`arguments_json`) replaced by `[REDACTED:NAME]`:

- environment variables by name: `*_API_KEY`, `*_KEY`, `*_TOKEN`, `*_PAT`, `*_PASS`, `*_PWD`,
  `*SECRET*`, `*PASSWORD*`, `*PASSWD*`, `*_ACCESS_KEY`, `*_PRIVATE_KEY`, `*_CREDENTIAL(S)`,
  `*_AUTH`, and those named in `LOOPSTREAM_SECRETS` (comma-separated);
- environment variables by value: a value of a well-known token shape (below) or a URL with
  a password (`DATABASE_URL=postgres://u:pw@db/x`), whatever the name;
- values a program passes explicitly (`Runtime(secrets=…)`);
- well-known token shapes anywhere in the text, named by kind (`[REDACTED:github-token]`):
  OpenAI/Anthropic `sk-…`, GitHub `ghp_…`/`github_pat_…`, Slack `xox…`, AWS `AKIA…`, Stripe
  `sk_live_…`, Google `AIza…`, JWTs, PEM private keys; and the password of any
  `scheme://user:password@host` (`[REDACTED:url-password]`).

Named values shorter than 8 characters are skipped (too likely to match ordinary text).

Redacted is what is logged, not what a tool gets: `reveal` puts the value of environment
variable NAME back in place of `[REDACTED:NAME]` in a tool call's arguments when the tool runs
(processors/tools.py), if that placeholder came into the conversation from outside the model
(a goal, a user message, a tool result) and the policy allows it (`secrets.reveal_to_tools`).
A literal `[REDACTED:…]` in such outside text is defused first, so no page or file can forge
one. Secrets found only by their shape have no variable to come back from: tools get the
placeholder.

The caps (`TEXT_LIMITS`, one entry per field written from outside) keep a 10 MB exception
message or model reply out of the log and the model's context; a cut text ends with
`…[N more characters cut]`.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

MIN_SECRET_LEN = 8
SECRETS_ENV = "LOOPSTREAM_SECRETS"
SECRET_NAME = re.compile(
    r"(?:^|_)(?:API_?KEY|KEY|TOKEN|PAT|PASS|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?|AUTH)$|_PWD$"
    r"|SECRET|PASSWORD|PASSWD",
    re.IGNORECASE,
)
# Well-known token shapes: kind -> (literals one of which each match contains, pattern). A
# pattern runs only on text holding one of its literals, so ordinary text costs a few
# substring tests.
TOKEN_PATTERNS: dict[str, tuple[tuple[str, ...], str]] = {
    "private-key": (("-----BEGIN",),
                    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z0-9 ]*PRIVATE KEY-----"),
    "stripe-key": (("k_live_", "k_test_"), r"\b[sr]k_(?:live|test)_[0-9A-Za-z]{16,}"),
    "openai-key": (("sk-",), r"\bsk-(?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{20,}"),
    "github-token": (("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
                     r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})"),
    "slack-token": (("xox",), r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    "aws-access-key-id": (("AKIA", "ASIA"), r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "google-api-key": (("AIza",), r"\bAIza[0-9A-Za-z_-]{35}"),
    "jwt": (("eyJ",), r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
}
_SHAPES = [(markers, re.compile(p), f"[REDACTED:{kind}]") for kind, (markers, p) in TOKEN_PATTERNS.items()]
_WHOLE_TOKEN = re.compile("|".join(f"(?:{p})" for _, p in TOKEN_PATTERNS.values()))
_USERINFO = re.compile(r"([^\s:/@\"'\\]+:)([^\s/@\"'\\]+)@")  # right after "scheme://": user:password@
PLACEHOLDER = re.compile(r"\[REDACTED:([A-Za-z_][A-Za-z0-9_]*)\]")
LITERAL_PLACEHOLDER = "[REDACTED:"
DEFUSED_PLACEHOLDER = "[quoted REDACTED:"
# Fields whose text comes from outside the model (people, tools): a literal placeholder in
# them is defused before redaction, so only a real redaction there can be revealed to a tool.
OUTSIDE_TEXT = frozenset({("GoalReceived", "text"), ("UserMessage", "text"), ("ToolCompleted", "result"),
                          ("ToolFailed", "message")})

Secrets = Mapping[str, str] | Iterable[str]  # name -> value, or bare values (named SECRET)


def is_secret_name(name: str) -> bool:
    return SECRET_NAME.search(name) is not None


def is_secret_value(value: str) -> bool:
    """A value of a well-known token shape, or a URL with a password in it."""
    return bool(value) and (_WHOLE_TOKEN.fullmatch(value.strip()) is not None
                            or ("://" in value and _redact_url_passwords(value) != value))


_ALL_MARKERS = tuple(m for markers, _, _ in _SHAPES for m in markers) + ("://",)
_ANY_MARKER = re.compile("|".join(re.escape(m) for markers, _, _ in _SHAPES for m in markers) + "|://")


def redact_shapes(text: str) -> str:
    """`text` with well-known token shapes and URL passwords redacted."""
    if len(text) < 1024:
        if _ANY_MARKER.search(text) is None:  # most fields: one search
            return text
    elif not [m for m in _ALL_MARKERS if m in text]:  # long text: substring tests beat the regex
        return text
    for markers, rx, placeholder in _SHAPES:
        for m in markers:
            if m in text:
                text = rx.sub(placeholder, text)
                break
    return _redact_url_passwords(text) if "://" in text else text


def _redact_url_passwords(text: str) -> str:
    """`scheme://user:password@host` → `scheme://user:[REDACTED:url-password]@host`, found
    from each `://` (a scan of the whole text by one regex costs milliseconds on 64 KB)."""
    out, start, at = [], 0, text.find("://")
    while at != -1:
        m = _USERINFO.match(text, at + 3)
        if m is not None:
            out += [text[start:m.start(2)], "[REDACTED:url-password]"]
            start = m.end(2)
        at = text.find("://", max(at + 3, start))
    return "".join(out) + text[start:] if out else text


class Redactor:
    """Replaces each known secret value with `[REDACTED:NAME]`, then token shapes and URL
    passwords with `[REDACTED:kind]`."""

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

    def text(self, value: str, outside: bool = False) -> str:
        if outside and LITERAL_PLACEHOLDER in value:
            value = value.replace(LITERAL_PLACEHOLDER, DEFUSED_PLACEHOLDER)
        if self.rx is not None and self.rx.search(value) is not None:
            value = self.rx.sub(lambda m: f"[REDACTED:{self.names[m.group(0)]}]", value)
        return redact_shapes(value)

    def payload(self, model: BaseModel) -> Any:
        """`model` with every string field redacted (the same object when nothing changed)."""
        return _walk(model, lambda owner, field, text: self.text(text, (owner, field) in OUTSIDE_TEXT))


_LEAVES = frozenset({int, float, bool, type(None), bytes})  # no text in them: skipped at once
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # a model class -> its field names


def _walk(value: Any, fix: Any, owner: str = "", field: str = "") -> Any:
    """`value` with `fix(owner type, field name, text)` applied to every string in it; the
    same objects where nothing changed."""
    kind = type(value)
    if kind is str:
        return fix(owner, field, value)
    if kind in _LEAVES:
        return value
    if isinstance(value, BaseModel):
        changes = {}
        owner = kind.__name__
        names = _FIELD_NAMES.get(kind)
        if names is None:
            names = _FIELD_NAMES[kind] = tuple(kind.model_fields)
        for name in names:
            old = getattr(value, name)
            t = type(old)
            if t is str:
                new = fix(owner, name, old)
            elif t in _LEAVES:
                continue
            else:
                new = _walk(old, fix, owner, name)
            if new is not old:
                changes[name] = new
        return value.model_copy(update=changes) if changes else value
    if isinstance(value, str):  # a str subclass
        return fix(owner, field, value)
    if isinstance(value, list):
        items = [_walk(v, fix, owner, field) for v in value]
        return items if any(a is not b for a, b in zip(items, value)) else value
    if isinstance(value, dict):
        out = {k: _walk(v, fix, owner, field) for k, v in value.items()}
        return out if any(out[k] is not value[k] for k in value) else value
    return value


def secret_values(environ: Mapping[str, str] | None = None, extra: Secrets = ()) -> list[tuple[str, str]]:
    """(name, value) of every secret: secret-looking env vars (by name or by value),
    LOOPSTREAM_SECRETS, `extra`."""
    env = os.environ if environ is None else environ
    listed = {n.strip() for n in env.get(SECRETS_ENV, "").split(",") if n.strip()}
    found = [(k, v) for k, v in env.items() if v and (k in listed or is_secret_env(k, v))]
    if isinstance(extra, Mapping):
        found += [(str(k), str(v)) for k, v in extra.items()]
    else:
        found += [("SECRET", str(v)) for v in extra]
    return found


def is_secret_env(name: str, value: str) -> bool:
    """Does this environment variable hold a secret (by its name or its value)?"""
    return name != SECRETS_ENV and (is_secret_name(name) or is_secret_value(value))


_CACHE: dict[tuple, Redactor] = {}
_SECRET_ITEMS: dict[tuple[object, object], bool] = {}  # raw env (key, value) -> is it a secret


def _env_fingerprint() -> tuple:
    """The raw (undecoded) secret items of os.environ plus the LOOPSTREAM_SECRETS ones: cheap
    to compute per event (one dict lookup per variable), and it changes whenever a secret does."""
    data = getattr(os.environ, "_data", None)
    if not isinstance(data, dict):  # not CPython's os.environ: the slow, decoded path
        return tuple(sorted(secret_values()))
    out = []
    for k, v in data.items():
        secret = _SECRET_ITEMS.get((k, v))
        if secret is None:
            if len(_SECRET_ITEMS) > 4096:
                _SECRET_ITEMS.clear()
            name, text = (x.decode("utf-8", "surrogateescape") if isinstance(x, bytes) else x for x in (k, v))
            secret = _SECRET_ITEMS[(k, v)] = is_secret_env(name, text) or name == SECRETS_ENV
        if secret:
            out.append((k, v))
    listed = os.environ.get(SECRETS_ENV)
    if listed:
        out += [(n, os.environ.get(n.strip())) for n in listed.split(",")]
    return tuple(out)


# The last redactor `current` gave, with what it was built from: (a copy of the environment's
# raw items, `extra` (a copy, if a Mapping), the redactor). While neither changed, one dict
# comparison (its values are the very same objects: compared by identity) finds it again.
_LAST: tuple | None = None


def current(extra: Secrets = ()) -> Redactor:
    """The redactor for the environment as it is now (plus `extra`), compiled once per change."""
    global _LAST
    if not isinstance(extra, Mapping):
        extra = tuple(extra)  # a generator is read once
    data = getattr(os.environ, "_data", None)
    last = _LAST
    if isinstance(data, dict) and last is not None and last[0] == data and last[1] == extra:
        return last[2]
    extra_key = tuple(sorted(extra.items())) if isinstance(extra, Mapping) else extra
    key = (_env_fingerprint(), isinstance(extra, Mapping), extra_key)
    found = _CACHE.get(key)
    if found is None:
        if len(_CACHE) > 32:
            _CACHE.clear()
        found = _CACHE[key] = Redactor(secret_values(extra=extra))
    if isinstance(data, dict):
        _LAST = (dict(data), dict(extra) if isinstance(extra, Mapping) else extra, found)
    return found


def redact(payload: Any, extra: Secrets = ()) -> Any:
    """`payload` (a pydantic model) with every secret replaced by `[REDACTED:NAME]`."""
    return current(extra).payload(payload)


# -- caps ------------------------------------------------------------------------------
# The longest text each field may hold, declared once: (payload or record type, field) ->
# characters. A string field not named here gets DEFAULT_TEXT_LIMIT; UNCAPPED ones are JSON
# that loopstream writes itself and would be broken by a cut.
TEXT_LIMITS: dict[tuple[str, str], int] = {
    ("SessionStarted", "system_prompt"): 200_000,
    ("SessionStarted", "workdir"): 8_192,
    ("GoalReceived", "text"): 100_000,
    ("UserMessage", "text"): 100_000,
    ("ModelResponded", "text"): 100_000,
    ("ToolCallRecord", "arguments_json"): 1_000_000,
    ("ToolRequested", "arguments_json"): 1_000_000,
    ("ApprovalRequested", "arguments_json"): 1_000_000,
    ("ToolCompleted", "result"): 64_000,
    ("ToolFailed", "message"): 16_000,
    ("ModelFailed", "message"): 8_000,
    ("SessionFinished", "answer"): 100_000,  # = ModelResponded.text: an answer is never cut below its reply
    ("SessionFailed", "reason"): 16_000,
    ("GuardrailTripped", "message"): 16_000,
    ("ContextCompacted", "summary"): 100_000,
    ("WorkspaceCheckpointed", "workdir"): 8_192,
    ("GoalVerificationRequested", "command"): 16_000,
    ("GoalVerified", "output"): 16_000,
    ("EvalGraded", "detail"): 16_000,
    ("FeedbackGiven", "comment"): 16_000,
    ("MemoryRecalled", "text"): 64_000,
    ("MemoryRecalled", "query"): 16_000,
    ("ChildRecord", "task"): 100_000,  # = GoalReceived.text: a child's task is its goal
    ("ChildSettled", "text"): 100_000,  # = SessionFinished.answer
}
DEFAULT_TEXT_LIMIT = 4_096  # reasons, ids, names, models, kinds
UNCAPPED = frozenset({("SessionStarted", "config_json"), ("SessionForked", "overrides_json"),
                      ("SessionForked", "acknowledged_side_effects_json")})
_SURROGATE = re.compile("[\ud800-\udfff]")


def limit_for(owner: str, field: str) -> int | None:
    """The cap of a field, or None for UNCAPPED ones."""
    if (owner, field) in UNCAPPED:
        return None
    return TEXT_LIMITS.get((owner, field), DEFAULT_TEXT_LIMIT)


def cap_text(text: str, limit: int) -> str:
    """`text` if it fits in `limit` characters, else its start and a marker saying how many
    characters were cut (the whole at most `limit` long)."""
    if len(text) <= limit:
        return text
    marker_room = 40
    keep = max(0, limit - marker_room)
    return f"{text[:keep]}…[{len(text) - keep} more characters cut]"


def storable(text: str) -> str:
    """`text` as UTF-8 can store it: lone surrogates (undecodable bytes, half an emoji in a
    JSON reply) replaced by U+FFFD."""
    if text.isascii() or _SURROGATE.search(text) is None:
        return text
    return _SURROGATE.sub("\ufffd", text)


def _fit(owner: str, field: str, text: str) -> str:
    text = storable(text)
    limit = limit_for(owner, field)
    return text if limit is None else cap_text(text, limit)


def cap(payload: Any) -> Any:
    """`payload` with every string field within its limit (TEXT_LIMITS) and valid UTF-8 text."""
    return _walk(payload, _fit)


def sanitize(payload: Any, extra: Secrets = ()) -> Any:
    """What the writer stores: `payload` redacted (`redact`), then capped (`cap`), in one pass."""
    return sanitize_all([payload], extra)[0]


def sanitize_all(payloads: Iterable[Any], extra: Secrets = ()) -> list[Any]:
    """`sanitize` of each payload, with one redactor for the batch."""
    redactor = current(extra)
    text = redactor.text
    plain = redactor.rx is None  # no named secret to look for: most text is left as it is at once
    marker = _ANY_MARKER.search

    def fix(owner: str, field: str, value: str) -> str:
        # Short ASCII text with no token marker, no placeholder and no secret to look for
        # is already what would be stored (no cap is below DEFAULT_TEXT_LIMIT).
        if (plain and len(value) <= DEFAULT_TEXT_LIMIT and value.isascii() and marker(value) is None
                and LITERAL_PLACEHOLDER not in value):
            return value
        return _fit(owner, field, text(value, (owner, field) in OUTSIDE_TEXT))

    return [_walk(p, fix) for p in payloads]


# -- revealing a secret to the tool that needs it ----------------------------------------
def mentions_placeholder(value: Any) -> bool:
    """Whether any string in `value` (nested lists and dicts too) holds a `[REDACTED:…]`."""
    if isinstance(value, str):
        return LITERAL_PLACEHOLDER in value
    if isinstance(value, dict):
        return any(mentions_placeholder(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(mentions_placeholder(v) for v in value)
    return False


def placeholders_from_outside(messages: Iterable[Any]) -> set[str]:
    """Names of the `[REDACTED:NAME]` placeholders in messages not written by the model."""
    names: set[str] = set()
    for m in messages:
        if m.role != "assistant" and LITERAL_PLACEHOLDER in m.content:
            names.update(PLACEHOLDER.findall(m.content))
    return names


def reveal(arguments: Any, allowed: set[str], environ: Mapping[str, str] | None = None) -> Any:
    """`arguments` with each `[REDACTED:NAME]` whose NAME is in `allowed` and is a secret
    environment variable replaced by that variable's value (the same object when none is)."""
    env = os.environ if environ is None else environ
    listed = {n.strip() for n in env.get(SECRETS_ENV, "").split(",") if n.strip()}

    def value_of(match: re.Match) -> str:
        name = match.group(1)
        value = env.get(name) if name in allowed else None
        if value and (name in listed or is_secret_env(name, value)):
            return value
        return match.group(0)

    def fix(_owner: str, _field: str, text: str) -> str:
        return PLACEHOLDER.sub(value_of, text) if LITERAL_PLACEHOLDER in text else text

    if isinstance(arguments, str):
        return fix("", "", arguments)
    return _walk(arguments, fix)
