"""The memory tools the model calls: `remember` keeps a note for later sessions of its
namespace, `recall` searches them (core/memory.py, docs/memory.md).

`remember` writes nothing itself: its result carries a MemoryRemembered event (ToolOutcome),
which the tool processor records with the ToolCompleted in one batch, so the memory is in the
log exactly when the result is, and the session writer redacts secrets in both. The text is
cleaned (lone surrogates, control characters) and redacted before it is compared or counted; a
text over `[memory] max_chars` is refused rather than cut, and so is a write past
`max_writes` (per session) or `max_items` (per namespace). The same text twice is one memory.
"""
from __future__ import annotations

from loopstream.core import events as ev
from loopstream.core.memory import MemoryStore, clean_text, memory_id, one_line
from loopstream.core.secrets import current as redactor
from loopstream.tools.registry import Tool, ToolContext, ToolError, ToolOutcome, tool

MAX_RECALL = 20
MAX_QUERY_CHARS = 2_000


def _store(ctx: ToolContext) -> MemoryStore:
    if not ctx.policy.memory.enabled:
        raise ToolError("memory is off for this session ([memory] enabled = false)", "memory_off")
    if ctx.memory is None:
        raise ToolError("memory is not available with this log (an in-memory log has no store)", "memory_off")
    return ctx.memory


@tool(name="remember")
def remember(text: str, ctx: ToolContext) -> ToolOutcome:
    """Keep a short note (a fact, a preference, a lesson learned) for later sessions. Keep it
    self-contained and brief; never store secrets."""
    store, settings = _store(ctx), ctx.policy.memory
    cleaned = redactor().text(clean_text(text))
    if not cleaned:
        raise ToolError("nothing to remember: the text is empty", "invalid_arguments")
    if len(cleaned) > settings.max_chars:
        raise ToolError(f"too long to remember: {len(cleaned)} characters, at most {settings.max_chars}; "
                        "say it shorter", "invalid_arguments")
    namespace = settings.namespace
    if (same := store.find_text(namespace, cleaned)) is not None:
        return ToolOutcome(f"already remembered ({same.memory_id})")
    if store.count(session_id=ctx.session_id) >= settings.max_writes:
        raise ToolError(f"this session may remember at most {settings.max_writes} notes", "memory_full")
    if store.count(namespace) >= settings.max_items:
        raise ToolError(f"the memory of {namespace} is full ({settings.max_items} notes); "
                        "a person can forget some with `loopstream memory forget`", "memory_full")
    mid = memory_id(namespace, ctx.session_id, cleaned)
    return ToolOutcome(f"remembered ({mid})", (ev.MemoryRemembered(
        memory_id=mid, namespace=namespace, text=cleaned, kind="fact", source=f"session {ctx.session_id}"),))


@tool(name="recall")
def recall(query: str, ctx: ToolContext, limit: int = 5) -> str:
    """Search the notes kept in earlier sessions for words of `query`; the best matches, one per line."""
    store = _store(ctx)
    found = store.search(query[:MAX_QUERY_CHARS], ctx.policy.memory.namespace, max(1, min(limit, MAX_RECALL)))
    if not found:
        return "no memory matches"
    return "\n".join(f"- {'[lesson] ' if m.kind == 'lesson' else ''}{one_line(m.text)}" for m in found)


TOOLS: list[Tool] = [remember, recall]
NAMES = [t.name for t in TOOLS]
