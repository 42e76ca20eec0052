"""Per-session budgets: steps, tokens, cost and wall time. Checked before every model
step (`exceeded`: is there room for another call?) and after every reply (`overrun`: did
the last reply go past a budget?); the first one hit ends the session with a SessionFailed
naming it. The call in flight is bounded too: `remaining_seconds` and `remaining_tokens`
are what the model processor gives the provider (a deadline, a cap on the reply)."""
from __future__ import annotations

from loopstream.core import events as ev
from loopstream.core.state import SessionState


def cost_usd(state: SessionState) -> float | None:
    """Spend so far from the policy's prices (USD per million tokens), if any were given."""
    prices = state.policy.budgets.price_per_mtok
    if not prices:
        return None
    return (state.input_tokens * prices.input + state.output_tokens * prices.output) / 1e6


def exceeded(state: SessionState, next_step: int, now_ms: int) -> ev.SessionFailed | None:
    cfg = state.policy.budgets
    if state.max_steps and next_step > state.max_steps:
        return ev.SessionFailed(
            reason=f"step budget exhausted: {state.max_steps} model steps without a final answer",
            error_kind="max_steps",
        )
    max_tokens = cfg.max_tokens
    used = state.input_tokens + state.output_tokens
    if max_tokens and used >= int(max_tokens):
        return ev.SessionFailed(reason=f"token budget exhausted: used {used} of {max_tokens} tokens",
                                error_kind="budget_tokens")
    max_cost = cfg.max_cost_usd
    spent = cost_usd(state)
    if max_cost is not None and spent is not None and spent >= float(max_cost):
        return ev.SessionFailed(reason=f"cost budget exhausted: spent ${spent:.4f} of ${float(max_cost):.4f}",
                                error_kind="budget_cost")
    max_wall = cfg.max_wall_seconds
    if max_wall and state.started_ms and (now_ms - state.started_ms) / 1000 >= float(max_wall):
        elapsed = (now_ms - state.started_ms) / 1000
        return ev.SessionFailed(reason=f"time budget exhausted: {elapsed:.1f}s of {max_wall}s",
                                error_kind="budget_time")
    return None


def overrun(state: SessionState, now_ms: int) -> ev.SessionFailed | None:
    """A budget the session went past with its last reply (tokens, cost or wall time), so
    even a final answer is not success; None when every budget still holds."""
    cfg = state.policy.budgets
    used = state.input_tokens + state.output_tokens
    if cfg.max_tokens and used > cfg.max_tokens:
        return ev.SessionFailed(reason=f"token budget exceeded: the last reply brought the session to {used} "
                                       f"of {cfg.max_tokens} tokens", error_kind="budget_tokens")
    spent = cost_usd(state)
    if cfg.max_cost_usd is not None and spent is not None and spent > cfg.max_cost_usd:
        return ev.SessionFailed(reason=f"cost budget exceeded: the last reply brought the session to ${spent:.4f} "
                                       f"of ${cfg.max_cost_usd:.4f}", error_kind="budget_cost")
    if cfg.max_wall_seconds and state.started_ms and (now_ms - state.started_ms) / 1000 > cfg.max_wall_seconds:
        elapsed = (now_ms - state.started_ms) / 1000
        return ev.SessionFailed(reason=f"time budget exceeded: the last reply came {elapsed:.1f}s into a "
                                       f"{cfg.max_wall_seconds:g}s budget", error_kind="budget_time")
    return None


def remaining_seconds(state: SessionState, now_ms: int) -> float | None:
    """Seconds left of the wall-time budget (None: no such budget): the deadline of a call."""
    cfg = state.policy.budgets
    if not cfg.max_wall_seconds or not state.started_ms:
        return None
    return max(0.0, cfg.max_wall_seconds - (now_ms - state.started_ms) / 1000)


def remaining_tokens(state: SessionState) -> int | None:
    """Tokens left of the token budget (None: no such budget): a call's prompt and reply
    must fit in it, so the reply is capped at what is left after the prompt."""
    cfg = state.policy.budgets
    if not cfg.max_tokens:
        return None
    return max(0, cfg.max_tokens - state.input_tokens - state.output_tokens)
