"""The orchestrator: reads the folded state after each event and decides what comes next.

It never calls anything; it only chooses among the FSM's legal moves:
planning → ModelRequested; after a failed model call RetryScheduled (backoff), then
ModelFallback to the next model of the chain, then SessionFailed; a budget exceeded
(steps, tokens, cost, wall time) → SessionFailed;
a context over its token budget → CompactionRequested (the compaction processor answers), or,
when compaction cannot help, SessionFailed (the system prompt, goal and tool specs alone exceed
the budget) or ContextOverBudget before the request (nothing to compact now; it goes on);
acting → one ToolRequested per tool call, or SessionFinished with the reply's text — unless
that text is empty or was cut at the output cap: then GuardrailTripped (rule empty_answer or
truncated_answer) tells the model, and after guardrails.max_output_retries of those, SessionFailed;
or the answer checks (policy [answers], processors/answers.py: an answer echoing the last tool
error, or given before calling the tool the goal names) refuse it, up to answers.nudges times.
Goal mode (policy [goal] verify_command): a final answer is GoalVerificationRequested instead,
SessionFinished only once the verifier's GoalVerified passed; after goal.max_iterations failed
verifications, SessionFailed. A pause a person asked for while something was in flight takes
effect at the next planning step (GoalPaused by orchestrator).
"""
from __future__ import annotations

import json

from loopstream.core import events as ev
from loopstream.core.events import derived_id
from loopstream.core.processor import Emit
from loopstream.core.state import SessionState
from loopstream.processors import answers, budgets, loops
from loopstream.processors.compaction import compaction_range
from loopstream.processors.context import context_tokens, grew_since_compaction, space, worth_compacting
from loopstream.processors.guardrails import check_input, check_output
from loopstream.processors.retry import retry_delay_ms

CUT_AT_CAP = frozenset({"length", "max_tokens"})  # finish reasons of a reply stopped by the output cap (OpenAI, Anthropic)


class Orchestrator:
    name = "orchestrator"
    acts_for = "orchestrator"  # planning, acting, backing_off: the head of the log is owed a decision
    triggers = frozenset(ev.PAYLOAD_TYPES) - {"SessionStarted"}

    def handle(self, event: ev.Event, state: SessionState, now_ms: int) -> list[Emit]:
        if state.policy.unreadable:  # a recorded policy today's code cannot read: fail closed
            return [Emit(ev.SessionFailed(reason=state.policy.unreadable, error_kind="policy"))]
        guard = state.policy.guardrails
        if guard and event.type in ("GoalReceived", "UserMessage") and (trip := check_input(guard, event.payload.text)):
            return [Emit(trip), Emit(ev.SessionFailed(reason=f"input blocked by guardrail {trip.rule}",
                                                      error_kind="guardrail"))]
        return self._act(state, now_ms) if state.status == "acting" else self._plan(state, now_ms)

    def _plan(self, state: SessionState, now: int) -> list[Emit]:
        if state.pause_pending:  # a person asked for a pause while something was in flight: now it takes effect
            return [Emit(ev.GoalPaused(by="orchestrator", reason=f"the pause {state.paused_by} asked for"))]
        goal = state.policy.goal
        if goal.verify_command and state.last_verification.startswith("failed") \
                and state.goal_iterations >= goal.max_iterations:
            return [Emit(ev.SessionFailed(error_kind="goal_not_verified", reason=(
                f"the goal's verification failed {state.goal_iterations} time(s) (goal.max_iterations "
                f"{goal.max_iterations}); last: {state.last_verification}")))]
        step = state.step if state.step_open else state.step + 1
        if (stop := budgets.exceeded(state, step if not state.step_open else 0, now)) is not None:
            return [Emit(stop)]
        if state.status == "planning" and state.consecutive_model_failures:
            return self._after_failure(state, now)
        before: list[Emit] = []
        if state.status == "planning" and (context := self._context(state)):
            if not isinstance(context[-1].payload, ev.ContextOverBudget):
                return context  # compact first, or fail
            before = context  # the warning, then the request
        attempt = state.attempt + 1 if state.step_open else 1
        request_id = derived_id(state.session_id, "model", str(step), str(attempt))[:16]
        return [*before, Emit(ev.ModelRequested(request_id=request_id, step=step, attempt=attempt, model=state.model))]

    def _context(self, state: SessionState) -> list[Emit]:
        """The context budget's decision before a request: nothing (under budget),
        CompactionRequested, SessionFailed, or ContextOverBudget (the request goes out anyway)."""
        budget = state.policy.compaction.context_budget_tokens
        if not budget:
            return []
        estimated = context_tokens(state)
        if estimated <= budget:
            return []
        if state.policy.compaction.estimator == 1:  # as sessions recorded with it were decided
            span = compaction_range(state.messages, state.policy.compaction.keep_recent)
            return [] if span is None else [Emit(self._compact(state, span, estimated, budget))]
        where = space(state)
        if where.fixed > budget:
            return [Emit(ev.SessionFailed(error_kind="context_budget", reason=(
                f"the context budget of {budget} tokens is smaller than what every request carries "
                f"(~{where.fixed} tokens: {where.describe()}); raise compaction.context_budget_tokens "
                f"(--context-budget) or shorten the system prompt, the goal or the tool list")))]
        if not grew_since_compaction(state):
            return [Emit(ev.ContextOverBudget(estimated_tokens=estimated, budget_tokens=budget, reason=(
                f"still over budget after the compaction at seq {state.last_compaction_seq} and nothing new "
                f"since; {where.describe()}")))]
        span = compaction_range(state.messages, state.policy.compaction.keep_recent)
        if span is None or not worth_compacting(state, [m for m in state.messages
                                                        if m.seq is not None and span[0] <= m.seq <= span[1]]):
            return [Emit(ev.ContextOverBudget(estimated_tokens=estimated, budget_tokens=budget, reason=(
                f"nothing left to compact (the {state.policy.compaction.keep_recent} newest messages stay "
                f"verbatim); {where.describe()}")))]
        return [Emit(self._compact(state, span, estimated, budget))]

    def _compact(self, state: SessionState, span: tuple[int, int], estimated: int,
                 budget: int) -> ev.CompactionRequested:
        return ev.CompactionRequested(
            request_id=derived_id(state.session_id, "compact", str(state.seq))[:16],
            from_seq=span[0], to_seq=span[1], estimated_tokens=estimated, budget_tokens=budget,
        )

    def _after_failure(self, state: SessionState, now: int) -> list[Emit]:
        max_attempts = state.policy.retries.max_model_attempts
        delay = None
        if state.last_model_retryable and state.consecutive_model_failures < max_attempts:
            delay = retry_delay_ms(state.attempt + 1, state.last_failed_request_id,
                                   state.last_retry_after_ms, state.policy.retries)
            if delay is not None:
                return [Emit(ev.RetryScheduled(
                    target="model", ref_id=state.last_failed_request_id, attempt=state.attempt + 1,
                    delay_ms=delay, not_before_ms=now + delay,
                    reason=f"attempt {state.attempt} failed: {state.last_model_error}"[:500],
                ))]
        why = (f"{state.model} failed {state.consecutive_model_failures} time(s); last error: "
               f"{state.last_model_error}")
        if state.last_retry_after_ms is not None and delay is None and state.last_model_retryable:
            why += f" (the server asked to wait {state.last_retry_after_ms / 1000:.0f}s, longer than allowed)"
        chain = [m for m in state.policy.fallback_models if m not in state.fallbacks_used and m != state.model]
        if chain:
            return [Emit(ev.ModelFallback(from_model=state.model, to_model=chain[0], reason=why[:500]))]
        return [Emit(ev.SessionFailed(reason=f"model failed: {why}", error_kind="model_failed"))]

    def _act(self, state: SessionState, now_ms: int) -> list[Emit]:
        if (over := budgets.overrun(state, now_ms)) is not None:
            return [Emit(over)]  # the reply went past a budget: not even a final answer is success
        if (loop := loops.check(state)) is not None:
            return loop
        if state.last_reply_calls:
            return [
                Emit(
                    ev.ToolRequested(
                        call_id=call.call_id,
                        name=call.name,
                        arguments_json=json.dumps(call.arguments, sort_keys=True),
                        step=state.step,
                    ),
                    key=call.call_id,
                )
                for call in state.last_reply_calls
            ]
        answer = state.last_reply_text.strip()
        if (refused := self._unfinished(state, answer)) is not None:
            return refused
        if (refused := answers.check(state, answer)) is not None:
            return refused
        guard = state.policy.guardrails
        if guard and (trip := check_output(guard, answer)):
            tries = guard.max_output_retries
            if trip.action == "stop" or state.guardrail_trips >= tries:
                return [Emit(trip), Emit(ev.SessionFailed(
                    reason=f"output blocked by guardrail {trip.rule}: {trip.message}", error_kind="guardrail"))]
            return [Emit(trip)]  # the fold tells the model why; it answers again
        if (command := state.policy.goal.verify_command) and not state.goal_passed:
            return [Emit(ev.GoalVerificationRequested(iteration=state.goal_iterations + 1, command=command))]
        return [Emit(ev.SessionFinished(
            answer=answer,
            steps=state.step,
            input_tokens=state.input_tokens,
            output_tokens=state.output_tokens,
        ))]

    def _unfinished(self, state: SessionState, answer: str) -> list[Emit] | None:
        """An empty reply, or one the output cap cut off, is no final answer: the model is told
        and answers again, at most guardrails.max_output_retries times; then the session fails."""
        if answer and state.last_finish_reason not in CUT_AT_CAP:
            return None
        cap = state.sampling.max_output_tokens
        if answer:
            rule, note = "truncated_answer", (f"Your reply was cut off at the limit of {cap} output tokens. "
                                              "Reply again, shorter: give the final answer directly, or call a tool.")
            why = f"the model's answers were cut at the output cap ({cap} tokens; raise --max-output-tokens)"
        else:
            rule, note = "empty_answer", "Your reply was empty. Reply with the final answer to the goal, or call a tool."
            why = "the model's answers were empty"
        if state.unfinished_answers >= state.policy.guardrails.max_output_retries:
            return [Emit(ev.GuardrailTripped(stage="output", rule=rule, message=note, action="stop")),
                    Emit(ev.SessionFailed(reason=f"{why} {state.unfinished_answers + 1} time(s)", error_kind=rule))]
        return [Emit(ev.GuardrailTripped(stage="output", rule=rule, message=note, action="tell_model"))]
