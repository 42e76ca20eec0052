"""What a person does to memory, recorded through the session writer (docs/memory.md):
`forget` (MemoryForgotten, in the session that remembered the memory) and `learn` (a lesson:
a MemoryRemembered of kind `lesson` on an ended session, from the text given or from the
session's feedback and failed eval grades), which later sessions of its namespace are given
at their start. Both are annotations of an ended session (core/fsm.py `ANNOTATIONS`)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loopstream.core import events as ev
from loopstream.core.log import Log
from loopstream.core.memory import MemoryItem, MemoryStore, clean_text, memory_id, resolve_namespace
from loopstream.core.policy import Memory
from loopstream.core.secrets import current as redactor
from loopstream.core.state import SessionState
from loopstream.runtime.writer import SessionWriter, Written

MAX_LESSON_CHARS = 4_000


class MemoryCommandError(ValueError):
    """A memory command that cannot be done (one line: what and why)."""


def open_store(log: Log, *, readonly: bool = False) -> MemoryStore:
    store = MemoryStore.for_log(log, readonly=readonly)
    if store is None:
        raise MemoryCommandError("this log has no memory store (an in-memory log)")
    return store


def find_one(store: MemoryStore, prefix: str) -> MemoryItem:
    """The one memory whose id starts with `prefix`; MemoryCommandError otherwise."""
    prefix = prefix.strip()
    if not prefix:
        raise MemoryCommandError("the memory id is empty")
    found = store.find(prefix)
    exact = [m for m in found if m.memory_id == prefix]
    if exact:
        return exact[0]
    if not found:
        raise MemoryCommandError(f"no memory {prefix!r} (see `loopstream memory list`)")
    if len(found) > 1:
        raise MemoryCommandError(f"memory id prefix {prefix!r} is ambiguous: "
                                 f"{', '.join(m.memory_id for m in found[:5])}")
    return found[0]


def _ended(writer: SessionWriter, session_id: str, what: str) -> SessionState:
    state = writer.load(session_id)
    if not state.terminal:
        raise MemoryCommandError(f"session {session_id} is {str(state.status).replace('_', ' ')}: {what} "
                                 "once it has ended")
    return state


def forget(log: Log, prefix: str, by: str, reason: str = "") -> tuple[MemoryItem, Written]:
    """Forget the memory `prefix` names: a MemoryForgotten in the (ended) session that remembered it."""
    with open_store(log) as store:
        item = find_one(store, prefix)
    if item.forgotten:
        raise MemoryCommandError(f"memory {item.memory_id} is already forgotten (by {item.forgotten_by})")
    writer = SessionWriter(log)
    _ended(writer, item.session_id, f"forget memory {item.memory_id} of it")
    payload = ev.MemoryForgotten(memory_id=item.memory_id, namespace=item.namespace, by=by,
                                 reason=clean_text(reason)[:1000])
    return item, writer.record(item.session_id, [payload], f"person:{by}")


def namespace_of(state: SessionState) -> str:
    """The memory namespace of a session: the one it recorded, else the default one filled in
    with its agent and workdir."""
    if state.policy.memory.enabled:
        return state.policy.memory.namespace
    return resolve_namespace(Memory().namespace, state.agent, state.workdir or ".")


def lessons_from(events: Sequence[ev.Event]) -> list[str]:
    """Lessons a session's annotations hold: each feedback comment, each failed grade's detail."""
    out: list[str] = []
    for e in events:
        p = e.payload
        if isinstance(p, ev.FeedbackGiven) and p.comment.strip():
            out.append(p.comment)
        elif isinstance(p, ev.EvalGraded) and not p.passed and p.detail.strip():
            out.append(f"{p.suite}/{p.case_id} failed {p.kind}:{p.grader}: {p.detail}")
    return out


@dataclass
class Learned:
    session_id: str
    namespace: str
    lessons: list[ev.MemoryRemembered]
    written: Written | None


def learn(log: Log, session_id: str, by: str, text: str | None = None, namespace: str | None = None) -> Learned:
    """Lessons for the future sessions of `session_id`'s namespace: `text`, or (None) what its
    feedback and failed grades say; recorded as MemoryRemembered (kind lesson) on the session."""
    writer = SessionWriter(log)
    state = _ended(writer, session_id, "learn from it")
    ns = namespace or namespace_of(state)
    texts = [text] if text is not None else lessons_from(writer.log.read(session_id))
    redact = redactor().text
    lessons: list[ev.MemoryRemembered] = []
    for raw in texts:
        cleaned = redact(clean_text(raw))
        if not cleaned:
            continue
        if len(cleaned) > MAX_LESSON_CHARS:
            raise MemoryCommandError(f"a lesson is at most {MAX_LESSON_CHARS} characters, this one {len(cleaned)}")
        mid = memory_id(ns, session_id, cleaned)
        if all(x.memory_id != mid for x in lessons):
            lessons.append(ev.MemoryRemembered(memory_id=mid, namespace=ns, text=cleaned, kind="lesson",
                                               source=f"{by} on session {session_id}"))
    if not lessons:
        raise MemoryCommandError(f"session {session_id} has no lesson to learn: no --text, and no feedback "
                                 "comment or failed grade")
    with open_store(log) as store:
        known = {m.memory_id for m in lessons if store.get(m.memory_id) is not None}
    new = [m for m in lessons if m.memory_id not in known]
    written = writer.record(session_id, new, f"person:{by}") if new else None
    return Learned(session_id, ns, new, written)
