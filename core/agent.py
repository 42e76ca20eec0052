"""Assemble a runnable agent: provider + tools + processors over a log."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from loopstream.core.log import Log
from loopstream.core.runtime import EventCallback, Runtime
from loopstream.processors.compaction import CompactionProcessor
from loopstream.processors.model import ModelProcessor
from loopstream.processors.orchestrator import Orchestrator
from loopstream.processors.tools import ToolProcessor
from loopstream.providers.base import Provider
from loopstream.providers.errors import ProviderConfigError
from loopstream.providers.factory import open_provider
from loopstream.providers.ratelimit import RateLimiter
from loopstream.tools.registry import ToolRegistry, default_registry

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful assistant that completes the user's goal step by step. "
    "Use a tool whenever it can compute or look up something for you; do not guess results. "
    "When you have the answer, reply with it plainly and concisely."
)


def build_runtime(
    log: Log,
    provider: Provider,
    registry: ToolRegistry | None = None,
    on_event: EventCallback | None = None,
    fallbacks: Sequence[Provider] = (),
    summarize_with_model: bool = True,
    limits: Mapping[str, RateLimiter] | None = None,
) -> Runtime:
    registry = registry or default_registry()
    return Runtime(
        log,
        [Orchestrator(), ModelProcessor(provider, registry.specs(), fallbacks, limits), ToolProcessor(registry, reviewer=provider),
         CompactionProcessor(provider if summarize_with_model else None)],
        on_event=on_event,
    )


@contextmanager
def open_model(provider: str | None, model: str | None, base_url: str | None = None,
               action_mode: str | None = None,
               on_local_start: Callable[[], None] | None = None) -> Iterator[Provider]:
    """The provider for a run: `scripted` (tests, benchmarks) or a real one from the factory.

    `on_local_start` is called once the configuration is known to be valid and the
    local model server is about to start (so a CLI can say why it is waiting)."""
    if (provider or "").lower() == "scripted":
        from loopstream.providers.scripted import scripted_from_spec

        try:
            scripted = scripted_from_spec(model or "adder")
        except ValueError as exc:
            raise ProviderConfigError(str(exc)) from None
        yield scripted
        return
    with open_provider(model=model, provider=provider, base_url=base_url, action_mode=action_mode,
                       on_local_start=on_local_start) as built:
        yield built
