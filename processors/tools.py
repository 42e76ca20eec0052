"""The tool processor: ToolRequested → run the tool → ToolCompleted | ToolFailed.

Unknown tools, invalid arguments and exceptions inside a tool all become ToolFailed
events the model reads on its next step; none of them stops the loop.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from loopstream.core import events as ev
from loopstream.core.processor import Emit
from loopstream.core.state import SessionState
from loopstream.tools.registry import ToolContext, ToolError, ToolRegistry

MAX_RESULT_CHARS = 16_000


class ToolProcessor:
    name = "tools"
    triggers = frozenset({"ToolRequested"})

    def __init__(self, registry: ToolRegistry) -> None:
        self.registry = registry

    def handle(self, event: ev.Event, state: SessionState) -> list[Emit]:
        req = event.payload
        assert isinstance(req, ev.ToolRequested)
        if req.call_id not in state.pending_calls:
            return []  # already settled (a redelivery)
        started = time.monotonic()
        # Only the tools this session was started with are callable.
        allowed = self.registry.select([n for n in state.tools if n in self.registry.tools])
        try:
            arguments = json.loads(req.arguments_json)
            if not isinstance(arguments, dict):
                raise ToolError("tool arguments must be a JSON object", "invalid_arguments")
            ctx = ToolContext(workdir=Path(state.workdir or "."), session_id=state.session_id)
            result = allowed.call(req.name, arguments, ctx)
        except ToolError as exc:
            return [self._failed(req, exc.kind, str(exc), started)]
        except ValueError as exc:
            return [self._failed(req, "invalid_arguments", f"arguments are not JSON: {exc}", started)]
        except Exception as exc:  # a bug in a user's tool must reach the model, not kill the loop
            return [self._failed(req, "tool_exception", f"{type(exc).__name__}: {exc}", started)]
        if len(result) > MAX_RESULT_CHARS:
            result = result[:MAX_RESULT_CHARS] + f"\n…(truncated {len(result) - MAX_RESULT_CHARS} chars)"
        return [Emit(ev.ToolCompleted(
            call_id=req.call_id, name=req.name, result=result, latency_ms=_ms(started)
        ))]

    @staticmethod
    def _failed(req: ev.ToolRequested, kind: str, message: str, started: float) -> Emit:
        return Emit(ev.ToolFailed(
            call_id=req.call_id, name=req.name, error_kind=kind, message=message, latency_ms=_ms(started)
        ))


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
