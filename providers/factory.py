"""Choose and build a provider from arguments and the environment.

Entry point for the CLI:

    with open_provider(model=args.model) as provider:
        reply = provider.complete(messages, tools)

Selection (first match wins): explicit `provider` (or LOOPSTREAM_PROVIDER); a `claude*` model →
Anthropic; an explicit `base_url` → OpenAI-compatible; a local model name → local; a model while
OpenAI is configured, or a `gpt-*`/`o1|o3|o4*` model → OpenAI; ANTHROPIC_API_KEY → Anthropic;
OPENAI_API_KEY or OPENAI_BASE_URL → OpenAI-compatible; otherwise the keyless local model,
served by the machine's shared local server (LOOPSTREAM_LOCAL_SHARED=0: an in-process one).
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

from .anthropic import AnthropicProvider
from .base import Provider
from .errors import ProviderConfigError
from .local import LOCAL_MODELS, LocalServer, local_model, local_provider
from .local_shared import SharedLocalProvider, SharedLocalServer, idle_seconds, shared_enabled
from .openai_compat import ACTION_MODES, OpenAICompatProvider

OPENAI_URL = "https://api.openai.com/v1"
DEFAULT_MODELS = {"anthropic": "claude-sonnet-4-5", "openai": "gpt-4o-mini"}
_ALIASES = {
    "anthropic": "anthropic", "claude": "anthropic",
    "openai": "openai", "openai-compatible": "openai", "openai_compat": "openai", "openai-compat": "openai",
    "local": "local", "llamacpp": "local", "llama.cpp": "local",
}
_OPENAI_PREFIXES = ("gpt-", "o1", "o3", "o4", "chatgpt")
_LOCAL_NAMES = {"local"} | {m.name for m in LOCAL_MODELS.values()} | {m.key for m in LOCAL_MODELS.values()}


def _choose(model: str | None, base_url: str | None, env: Mapping[str, str]) -> str:
    m = (model or "").lower()
    openai_configured = bool(env.get("OPENAI_API_KEY") or env.get("OPENAI_BASE_URL"))
    if m.startswith("claude"):
        return "anthropic"
    if base_url:
        return "openai"
    if m in _LOCAL_NAMES:
        return "local"
    if m and (openai_configured or m.startswith(_OPENAI_PREFIXES)):
        return "openai"
    if env.get("ANTHROPIC_API_KEY"):
        return "anthropic"
    if openai_configured:
        return "openai"
    if m:
        raise ProviderConfigError(
            f"no provider for model {model!r}: set ANTHROPIC_API_KEY, OPENAI_API_KEY or OPENAI_BASE_URL"
        )
    return "local"


def _check_mode(mode: str | None, what: str) -> None:
    if mode is not None and mode not in ACTION_MODES:
        raise ProviderConfigError(f"unknown {what} {mode!r}; use one of {', '.join(ACTION_MODES)}")


def make_provider(
    model: str | None = None,
    provider: str | None = None,
    base_url: str | None = None,
    action_mode: str | None = None,
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[Provider, AbstractContextManager[Any] | None]:
    """Build a provider; the second item is a context to enter before use (the local server) or None."""
    env = os.environ if env is None else env
    model = model or env.get("LOOPSTREAM_MODEL") or None
    forced = provider or env.get("LOOPSTREAM_PROVIDER") or None
    if forced is not None:
        kind = _ALIASES.get(forced.strip().lower())
        if kind is None:
            raise ProviderConfigError(f"unknown provider {forced!r}; use anthropic, openai or local")
    else:
        kind = _choose(model, base_url, env)
    _check_mode(action_mode, "action mode")

    if kind == "anthropic":
        key = env.get("ANTHROPIC_API_KEY")
        if not key:
            raise ProviderConfigError("the Anthropic provider needs ANTHROPIC_API_KEY in the environment")
        if action_mode not in (None, "native"):
            raise ProviderConfigError("the Anthropic provider only supports action mode 'native'")
        url = base_url or env.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com"
        return AnthropicProvider(key, model or DEFAULT_MODELS["anthropic"], url, timeout or 120.0), None

    if kind == "openai":
        url = (base_url or env.get("OPENAI_BASE_URL") or OPENAI_URL).rstrip("/")
        key = env.get("OPENAI_API_KEY")
        official = "api.openai.com" in url
        if official and not key:
            raise ProviderConfigError(f"the OpenAI provider needs OPENAI_API_KEY in the environment (server {url})")
        if not model and not official:
            raise ProviderConfigError(f"set LOOPSTREAM_MODEL (or --model) to the model name served at {url}")
        # LOOPSTREAM_ACTION_MODE is for other servers (small models that need json modes);
        # the default is native, and replies that put a JSON call in the text are still parsed.
        env_mode = None if official else env.get("LOOPSTREAM_ACTION_MODE") or None
        _check_mode(env_mode, "LOOPSTREAM_ACTION_MODE")
        mode = action_mode or env_mode or "native"
        return OpenAICompatProvider(url, key, model or DEFAULT_MODELS["openai"], mode, timeout or 120.0), None  # type: ignore[arg-type]

    try:
        chosen = local_model(model)
    except ValueError as exc:
        raise ProviderConfigError(f"the local provider: {exc}") from None
    if importlib.util.find_spec("xllamacpp") is None:
        raise ProviderConfigError(
            "no model provider: set ANTHROPIC_API_KEY or OPENAI_API_KEY/OPENAI_BASE_URL, "
            f"or {chosen.install_hint} for the keyless local model {chosen.name}"
        )
    mode, wait = action_mode or "json_schema", timeout or 600.0
    if shared_enabled(env):  # one server per machine, shared by every run (local_shared.py)
        shared = SharedLocalServer(idle=idle_seconds(env), model=chosen)
        return SharedLocalProvider(shared, action_mode=mode, timeout=wait), shared
    server = LocalServer(model=chosen)  # LOOPSTREAM_LOCAL_SHARED=0: this run's own, in this process
    return local_provider(server, action_mode=mode, timeout=wait), server


@contextmanager
def open_provider(
    model: str | None = None,
    provider: str | None = None,
    base_url: str | None = None,
    action_mode: str | None = None,
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    on_local_start: Callable[[], None] | None = None,
) -> Iterator[Provider]:
    """Yield a ready provider; starts and stops the local model server when that is the choice.

    `on_local_start` is called once the configuration is known to be valid and the local
    server is about to start (so a CLI can say why it is waiting)."""
    built, context = make_provider(model, provider, base_url, action_mode, timeout=timeout, env=env)
    with ExitStack() as stack:
        if context is not None:
            if on_local_start is not None:
                on_local_start()
            stack.enter_context(context)
        close = getattr(built, "close", None)
        if callable(close):
            stack.callback(close)  # runs before the server stops (LIFO)
        yield built
