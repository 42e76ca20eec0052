"""The compaction processor: CompactionRequested → ContextCompacted.

It summarizes the messages of a seq range, with the session's model when one is
given (a plain completion, no tools) and extractively otherwise or when the model
fails. The originals stay in the log: the fold replaces the range by the summary
only from the ContextCompacted event on, so replaying or forking before it sees the
full context.

PreCompact hooks (processors/hooks.py) run first; their decisions are appended alone and the
compaction goes on from the last one (a redo does not run them again). Their notes join the
summarizer's instructions; a deny or stop ends the session.
"""
from __future__ import annotations

from loopstream.core import events as ev
from loopstream.core.processor import Emit
from loopstream.core.state import SessionState, compacted
from loopstream.processors import hooks
from loopstream.processors.context import calibration, context_tokens
from loopstream.providers.base import Message, Provider, ProviderError
from loopstream.providers.tokens import text_tokens

SUMMARY_PROMPT = (
    "You compress the transcript of an agent's work so it can continue with less context. "
    "Keep every fact it will need: the goal, decisions, tool results (numbers, names, paths), "
    "errors, and what remains to do. Write plain sentences, at most {limit} characters."
)
MIN_SUMMARY_CHARS = 200  # a summary shorter than this keeps too little: over budget instead (ContextOverBudget)


def compaction_range(messages: list[Message], keep_recent: int) -> tuple[int, int] | None:
    """The seq range to summarize: after the system prompt and the goal, up to the last
    message before the `keep_recent` newest, ending where an assistant turn begins (so a
    tool call is never separated from its result). None when there is too little to gain."""
    start = 1 if messages and messages[0].role == "system" else 0
    start += 1  # the goal stays verbatim
    # (keep_recent 0 keeps the newest message anyway: a range ends before an assistant turn)
    ends = [e for e in range(start, len(messages) - max(keep_recent, 1)) if messages[e + 1].role == "assistant"]
    if not ends or ends[-1] - start + 1 < 2:
        return None
    first, last = messages[start].seq, messages[ends[-1]].seq
    if first is None or last is None:
        return None
    return first, last


class CompactionProcessor:
    name = "compaction"
    acts_for = "compaction"  # compacting: the open CompactionRequested
    triggers = frozenset({"CompactionRequested", "HookDecided"})

    def __init__(self, provider: Provider | None = None) -> None:
        self.provider = provider

    def handle(self, event: ev.Event, state: SessionState, now_ms: int) -> list[Emit]:
        # the open CompactionRequested (the event itself, or a PreCompact decision after it)
        req = event.payload if isinstance(event.payload, ev.CompactionRequested) else state.open_compaction
        assert req is not None
        if not state.compaction_hooked and hooks.matching(state.policy.hooks, "PreCompact"):
            before = hooks.run_point("PreCompact", state, {
                "trigger": "auto", "from_seq": req.from_seq, "to_seq": req.to_seq,
                "estimated_tokens": req.estimated_tokens, "budget_tokens": req.budget_tokens}, f"{req.request_id}.pre")
            return [*before.emits, hooks.stop_session(before)] if before.stopped else before.emits
        span = [m for m in state.messages if m.seq is not None and req.from_seq <= m.seq <= req.to_seq]
        text = transcript(span)
        before = context_tokens(state)  # the measure the budget is checked with

        def after(summary: str) -> int:
            return context_tokens(state, compacted(state.messages, req.from_seq, req.to_seq, summary))

        # As long as the room under the budget allows (but never shorter than MIN_SUMMARY_CHARS),
        # at most half of what it replaces (an earlier summary in the range included).
        room = _chars_for(req.budget_tokens - after(""), text, state)
        limit = max(1, min(state.policy.compaction.summary_chars, len(text) // 2, max(room, MIN_SUMMARY_CHARS)))
        summary, method = self._summarize(span, limit, state.compaction_note)
        while summary and after(summary) >= before:  # it must shrink: a model's text may count worse
            summary, method = extractive_summary(span, len(summary) // 2), "extractive"
        return [Emit(ev.ContextCompacted(
            request_id=req.request_id, from_seq=req.from_seq, to_seq=req.to_seq, summary=summary,
            method=method, tokens_before=before, tokens_after=after(summary),
        ))]

    def _summarize(self, span: list[Message], limit: int, note: str = "") -> tuple[str, str]:
        if self.provider is not None:
            instructions = SUMMARY_PROMPT.format(limit=limit) + (f"\nAlso: {note}" if note else "")
            prompt = [Message(role="system", content=instructions),
                      Message(role="user", content=transcript(span))]
            try:
                reply = self.provider.complete(prompt, [])
                if reply.text.strip() and not reply.tool_calls:
                    return reply.text.strip()[:limit], "model"
            except ProviderError:
                pass  # compaction must not stop the session: fall back to extractive
        return extractive_summary(span, limit), "extractive"


def _chars_for(tokens: int, text: str, state: SessionState) -> int:
    """About how many characters of text like `text` make `tokens` (calibrated) tokens."""
    if tokens <= 0:
        return 0
    per_token = len(text) / max(1, text_tokens(text, state.provider))
    return int(tokens / calibration(state) * per_token)


def transcript(messages: list[Message]) -> str:
    lines = []
    for m in messages:
        calls = "; ".join(f"{c.name}({c.arguments})" for c in m.tool_calls)
        body = m.content + (f" [calls: {calls}]" if calls else "")
        lines.append(f"{m.role}{'/' + m.name if m.name else ''}: {body}")
    return "\n".join(lines)


def extractive_summary(messages: list[Message], limit: int) -> str:
    """Each message shortened to one line; the middle dropped first when over `limit`."""
    lines = [line[:160] for line in transcript(messages).splitlines()]
    text = "\n".join(lines)
    while len(text) > limit and len(lines) > 2:
        lines.pop(len(lines) // 2)
        text = "\n".join(lines[: len(lines) // 2] + ["…"] + lines[len(lines) // 2:])
    return text[:limit]
