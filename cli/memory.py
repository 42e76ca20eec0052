"""`loopstream memory list|search|forget|learn|rebuild`: the memory store of the log
(core/memory.py, docs/memory.md). list and search open the log read-only; forget and learn
record events through the session writer (runtime/memory.py)."""
from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from loopstream.cli import output
from loopstream.cli.common import BusOpt, DbOpt, SessionArg, UserError, reader, resolve, writer
from loopstream.core.memory import KINDS, MemoryItem, MemoryStore, one_line
from loopstream.runtime.decisions import person
from loopstream.runtime.memory import MemoryCommandError, find_one, forget, learn, open_store

memory_app = typer.Typer(help="Memory across sessions: list, search, forget, learn lessons, rebuild.",
                         no_args_is_help=True, rich_markup_mode=None, add_completion=False)

NamespaceOpt = Annotated[Optional[str], typer.Option(
    "--namespace", "-n", show_default=False, help="Only this namespace (e.g. ada/default/myproject; default: all).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]
LimitOpt = Annotated[int, typer.Option(min=1, max=10_000, help="At most this many.")]
ByOpt = Annotated[Optional[str], typer.Option(help="Who does it (default: your user name).", show_default=False)]


def _store(bus: str | None, db, *, readonly: bool) -> MemoryStore:
    log = reader(bus, db) if readonly else writer(bus, db)
    try:
        return open_store(log, readonly=readonly)
    except MemoryCommandError as exc:
        raise UserError(str(exc)) from None


def _print(items: list[MemoryItem], as_json: bool, empty: str) -> None:
    if as_json:
        for m in items:
            output.answer(json.dumps({"id": m.memory_id, "namespace": m.namespace, "kind": m.kind, "text": m.text,
                                      "session": m.session_id, "seq": m.seq, "time_ms": m.time_ms,
                                      "forgotten": m.forgotten}, ensure_ascii=False))
        return
    if not items:
        output.note(empty)
        return
    output.table(["id", "namespace", "kind", "session", "text"],
                 [(m.memory_id, m.namespace, m.kind + (" (forgotten)" if m.forgotten else ""), m.session_id,
                   one_line(m.text, 200)) for m in items])


@memory_app.command("list")
def list_memories(
    namespace: NamespaceOpt = None,
    kind: Annotated[Optional[str], typer.Option(help="fact | lesson.", show_default=False)] = None,
    forgotten: Annotated[bool, typer.Option("--forgotten", help="Show forgotten memories too.")] = False,
    limit: LimitOpt = 100,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """The memories of the log, newest first (the log is opened read-only)."""
    if kind is not None and kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    with _store(bus, db, readonly=True) as store:
        items = store.items(namespace, kind=kind, forgotten=forgotten, limit=limit)
    _print(items, as_json, "no memories" + (f" in {namespace}" if namespace else ""))


@memory_app.command()
def search(
    query: Annotated[str, typer.Argument(help="Words to look for (any of them; best matches first).",
                                         show_default=False)],
    namespace: NamespaceOpt = None,
    limit: LimitOpt = 10,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Full-text search (SQLite FTS5) of the live memories (the log is opened read-only)."""
    if not query.strip():
        raise UserError("the search query is empty")
    with _store(bus, db, readonly=True) as store:
        items = store.search(query, namespace, limit)
    _print(items, as_json, "no memory matches")


@memory_app.command("forget")
def forget_memory(
    memory: Annotated[str, typer.Argument(help="Memory id (a unique prefix is enough).", show_default=False)],
    reason: Annotated[str, typer.Option(help="Why (recorded).")] = "",
    by: ByOpt = None,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Forget a memory: a MemoryForgotten event in the session that remembered it (once it ended)."""
    who = by or person().removeprefix("person:")
    try:
        item, _ = forget(writer(bus, db), memory, who, reason)
    except MemoryCommandError as exc:
        raise UserError(str(exc)) from None
    output.answer(f"forgot memory {item.memory_id} of {item.namespace} (recorded in session {item.session_id})")


@memory_app.command("learn")
def learn_lessons(
    session: SessionArg,
    text: Annotated[Optional[str], typer.Option(help="The lesson (default: the session's feedback comments "
                                                "and failed eval grades).", show_default=False)] = None,
    namespace: NamespaceOpt = None,
    by: ByOpt = None,
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """Turn an ended session's feedback (or --text) into lessons its agent's later sessions are given."""
    log = writer(bus, db)
    sid = resolve(log, session)
    who = by or person().removeprefix("person:")
    try:
        learned = learn(log, sid, who, text, namespace)
    except MemoryCommandError as exc:
        raise UserError(str(exc)) from None
    if not learned.lessons:
        output.answer(f"nothing new: these lessons are already in {learned.namespace}")
        return
    for lesson in learned.lessons:
        output.answer(f"lesson {lesson.memory_id} for {learned.namespace}: {one_line(lesson.text, 200)}")


@memory_app.command()
def show(
    memory: Annotated[str, typer.Argument(help="Memory id (a unique prefix is enough).", show_default=False)],
    db: DbOpt = None,
    bus: BusOpt = None,
) -> None:
    """One memory, whole, and where it was remembered (the log is opened read-only)."""
    with _store(bus, db, readonly=True) as store:
        try:
            item = find_one(store, memory)
        except MemoryCommandError as exc:
            raise UserError(str(exc)) from None
    output.answer(f"{item.memory_id} {item.kind} in {item.namespace}, remembered in session {item.session_id} "
                  f"at seq {item.seq}" + (f"; forgotten by {item.forgotten_by}" if item.forgotten else ""))
    output.answer(item.text)


@memory_app.command()
def rebuild(db: DbOpt = None, bus: BusOpt = None) -> None:
    """Rebuild the memory store from the log's events (it is a projection: nothing is lost)."""
    with _store(bus, db, readonly=False) as store:
        applied = store.rebuild()
        count = store.count()
    output.answer(f"memory store rebuilt from the log: {applied} memory events, {count} live memories")
