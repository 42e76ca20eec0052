"""Programmatic fan-out (docs/subagents.md): map a list of goals over one agent, in parallel
on a bounded pool, and gather the results in order, for pipelines that need no model to
decide. Each goal is an ordinary session; with a `key`, its session id is derived from the
key and its index, so running the same fan-out again after a crash continues the sessions
that exist instead of starting new ones."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from loopstream.core import events as ev
from loopstream.core.state import SessionState
from loopstream.processors.budgets import cost_usd
from loopstream.runtime.inline import Runtime
from loopstream.runtime.writer import SessionConfig


@dataclass(frozen=True)
class Result:
    """One goal's outcome: its session, status (done, failed, cancelled, or where it waits),
    answer or error, tokens, cost (None without prices), steps."""

    index: int
    goal: str
    session_id: str
    status: str
    answer: str | None
    error: str | None
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    steps: int

    @property
    def ok(self) -> bool:
        return self.status == "done"


def fan_out(runtime: Runtime, goals: Sequence[str], config: SessionConfig, *, max_parallel: int = 4,
            key: str | None = None, parent: SessionState | None = None) -> list[Result]:
    """Run one session per goal with `config` on `runtime`, at most `max_parallel` at once;
    the results in the order of `goals`. A failed session is a result, not an exception.
    `key` makes the session ids deterministic (a rerun continues them); `parent` links them
    as children of that session (SessionStarted v4) for `show` and `sessions`."""
    if max_parallel < 1:
        raise ValueError("max_parallel must be at least 1")
    if parent is not None:
        config = dataclasses.replace(config, parent_session_id=parent.session_id, depth=parent.depth + 1)

    def one(i: int, goal: str) -> Result:
        sid = ev.derived_id("fan-out", key, str(i))[:16] if key is not None else None
        if sid is None or not runtime.log.next_seq(sid):
            sid = runtime.start_session(goal, config, session_id=sid)
        state = runtime.run_session(sid)
        return Result(i, goal, sid, state.status, state.answer, state.error, state.input_tokens,
                      state.output_tokens, cost_usd(state), state.step)

    with ThreadPoolExecutor(max_workers=min(max_parallel, max(1, len(goals))),
                            thread_name_prefix="loopstream-fan-out") as pool:
        return list(pool.map(one, range(len(goals)), goals))
