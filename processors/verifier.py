"""The verifier: goal mode's success check. GoalVerificationRequested → run the goal's verify
command (policy `[goal] verify_command`) in the workdir, through the `shell` tool's code, so in
the session's sandbox (tools/sandbox.py) → GoalVerified (passed = exit code 0, the output).

Running the check again after a crash is harmless (it only reads), so a verification that was
interrupted is simply redone from its GoalVerificationRequested."""
from __future__ import annotations

import time
from pathlib import Path

from loopstream.core import events as ev
from loopstream.core.processor import Emit
from loopstream.core.state import SessionState
from loopstream.tools.registry import ToolContext, ToolError
from loopstream.tools.workspace import shell


class Verifier:
    name = "verifier"
    acts_for = "verifier"  # verifying: the open GoalVerificationRequested
    triggers = frozenset({"GoalVerificationRequested"})

    def handle(self, event: ev.Event, state: SessionState, now_ms: int) -> list[Emit]:
        p = event.payload
        started = time.monotonic()
        ctx = ToolContext(workdir=Path(state.workdir or "."), session_id=state.session_id, policy=state.policy)
        try:
            out = shell.invoke({"command": p.command, "timeout_s": state.policy.goal.verify_timeout_s}, ctx)
            first, _, output = out.partition("\n")
            code = int(first.split()[2]) if first.startswith("exit code ") else -1
        except ToolError as exc:  # a timeout, no sandbox: not passed, and the model is told why
            code, output = -1, f"the verification did not complete ({exc.kind}): {exc}"
        return [Emit(ev.GoalVerified(iteration=p.iteration, passed=code == 0, exit_code=code, output=output,
                                     latency_ms=int((time.monotonic() - started) * 1000)))]
