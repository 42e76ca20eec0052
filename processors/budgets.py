"""Per-session budgets: steps, tokens, cost and wall time. Checked before every model
step; the first one exceeded ends the session with a SessionFailed naming it."""
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
