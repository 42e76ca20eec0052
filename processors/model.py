"""The model processor: ModelRequested → one provider call → ModelResponded | ModelFailed.

The context it sends is the conversation folded from the log (the state's messages),
so nothing but the reply's new text and tool calls is written back.

Hooks (processors/hooks.py): PreModelCall hooks run first and their decisions are appended
alone (the model is then owed from the last one: a redo calls the model without running them
again; a note joins the conversation, a deny or stop ends the session). PostModelCall hooks
(on the reply) and Failure hooks (on a failed call, matcher `model`) are recorded in one batch
with the outcome.
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence

from loopstream.core import events as ev
from loopstream.core.processor import Emit
from loopstream.core.sampling import Sampling
from loopstream.core.state import SessionState
from loopstream.processors import budgets, hooks
from loopstream.processors.shaping import shaped
from loopstream.providers.base import Provider, ProviderError, ToolSpec
from loopstream.providers.ratelimit import RateLimiter
from loopstream.providers.tokens import RequestEstimate, estimate_request


class ModelProcessor:
    name = "model"
    acts_for = "model"  # awaiting_model: the open ModelRequested
    triggers = frozenset({"ModelRequested", "HookDecided"})

    def __init__(self, provider: Provider, tool_specs: list[ToolSpec], fallbacks: Sequence[Provider] = (),
                 limits: Mapping[str, RateLimiter] | None = None) -> None:
        self.provider = provider
        self.by_model = {p.model: p for p in fallbacks}
        self.limits = dict(limits or {})  # provider name -> its client-side rate limiter
        self.tool_specs = {t.name: t for t in tool_specs}

    def provider_for(self, model: str) -> Provider:
        """The session's current model: the primary, or a fallback after ModelFallback."""
        return self.by_model.get(model, self.provider) if model != self.provider.model else self.provider

    def handle(self, event: ev.Event, state: SessionState, now_ms: int) -> list[Emit]:
        if not state.model_hooked and hooks.matching(state.policy.hooks, "PreModelCall"):
            before = hooks.run_point("PreModelCall", state, {"model": state.model, "step": state.step,
                                                             "attempt": state.attempt}, f"{state.open_request_id}.pre")
            return [*before.emits, hooks.stop_session(before)] if before.stopped else before.emits
        # the open ModelRequested: the event itself, or the request a PreModelCall decision follows
        req = event.payload if isinstance(event.payload, ev.ModelRequested) else None
        request_id, step = (req.request_id, req.step) if req else (state.open_request_id or "", state.step)
        specs = [self.tool_specs[n] for n in state.tools if n in self.tool_specs]
        messages = shaped(state)  # what the model is sent; the log keeps every message whole
        provider = self.provider_for(state.model)
        limiter = self.limits.get(provider.name)
        # What this request carries, as the adapter writes it (no extra request): recorded with
        # the reply, it calibrates the orchestrator's next context estimate (processors/context.py).
        # A pass over the whole context: made only when a budget or a rate limit uses it.
        sent = (estimate_request(messages, specs, provider.name, getattr(provider, "action_mode", "native"))
                if limiter or _measures(state) else NOT_MEASURED)
        if limiter:
            limiter.acquire(sent.total)  # waits here rather than earning a 429
        started = time.monotonic()
        try:
            # The session's recorded settings, bounded by what is left of its budgets.
            reply = provider.complete(messages, specs, bounded(state, sent.total),
                                      timeout=budgets.remaining_seconds(state, now_ms))
        except ProviderError as exc:
            failed = hooks.run_point("Failure", state, {"model": provider.model, "step": step,
                                                        "error_kind": exc.kind, "error": str(exc)[:2000]},
                                     f"{request_id}.failure", "model")
            return [*failed.emits, Emit(ev.ModelFailed(
                request_id=request_id,
                error_kind=exc.kind,
                message=str(exc),
                retryable=exc.retryable,
                status=exc.status,
                latency_ms=_ms(started),
                retry_after_ms=None if exc.retry_after is None else int(exc.retry_after * 1000),
            )), *([hooks.stop_session(failed)] if failed.stopped else [])]
        if limiter:
            limiter.settle(sent.total, reply.input_tokens + reply.output_tokens)
        calls = [
            ev.ToolCallRecord(
                # Unique per session: the provider's ids may repeat across steps.
                call_id=f"s{step}.{i}.{c.call_id}"[:64],
                name=c.name,
                arguments_json=json.dumps(c.arguments, sort_keys=True),
            )
            for i, c in enumerate(reply.tool_calls)
        ]
        after = hooks.run_point("PostModelCall", state, {
            "model": reply.model or provider.model, "step": step, "response": reply.text,
            "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in reply.tool_calls]},
            f"{request_id}.post") if hooks.matching(state.policy.hooks, "PostModelCall") else hooks.Verdict([])
        return [Emit(ev.ModelResponded(
            request_id=request_id,
            text=reply.text,
            tool_calls=calls,
            input_tokens=reply.input_tokens,
            output_tokens=reply.output_tokens,
            latency_ms=_ms(started),
            finish_reason=reply.finish_reason,
            mode=reply.mode,
            model=reply.model or provider.model,
            estimated_input_tokens=sent.total,
            estimated_tool_tokens=sent.tools,
        )), *after.emits, *([hooks.stop_session(after)] if after.stopped else [])]


NOT_MEASURED = RequestEstimate(0, 0)


def _measures(state: SessionState) -> bool:
    """Whether the session's budgets read the request's size (the context budget, the token budget)."""
    return state.policy.compaction.context_budget_tokens is not None or state.policy.budgets.max_tokens is not None


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def bounded(state: SessionState, prompt_tokens: int) -> Sampling:
    """The session's sampling settings with the reply capped at what is left of its token
    budget once the prompt (`prompt_tokens`, the request's estimate) is paid for (at least 1
    token: the call's overrun then fails the session naming the budget, instead of a reply
    that could never fit)."""
    sampling = state.sampling
    left = budgets.remaining_tokens(state)
    if left is None:
        return sampling
    room = max(1, left - prompt_tokens)
    return sampling if room >= sampling.max_output_tokens else sampling.model_copy(update={"max_output_tokens": room})
