"""What the API returns: sessions, events, trees and diffs as JSON-ready dicts.

Texts go out as they are stored (the page escapes them); JSON is written with ASCII escapes,
so a lone surrogate in a model's or a tool's text is sent as `\\udXXX`, never as invalid UTF-8."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from loopstream.core import events as ev
from loopstream.core.describe import summarize
from loopstream.core.state import SessionState
from loopstream.replay.diff import DiffReport, render
from loopstream.replay.inspect import SessionRow, ShownSession
from loopstream.runtime.decisions import waiting_calls
from loopstream.web.links import Link, family

SUMMARY_WIDTH = 160


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=True, default=str).encode("ascii")


def row(r: SessionRow, link: Link | None) -> dict:
    return {"session_id": r.session_id, "created_ms": r.created_ms, "updated_ms": r.updated_ms,
            "status": r.status, "events": r.events, "goal": r.goal, "model": r.model,
            "parent": _link(link)}


def _link(link: Link | None) -> dict | None:
    return None if link is None else {"session_id": link.parent, "seq": link.parent_seq, "kind": link.kind}


def event(e: ev.Event) -> dict:
    return {"seq": e.seq, "event_id": e.event_id, "type": e.type, "time": e.time, "actor": e.actor,
            "causation_id": e.causation_id, "summary": summarize(e, SUMMARY_WIDTH),
            "payload": e.payload.model_dump(mode="json")}


def state(s: SessionState) -> dict:
    return {"status": str(s.status), "terminal": s.terminal, "answer": s.answer, "error": s.error,
            "step": s.step, "input_tokens": s.input_tokens, "output_tokens": s.output_tokens,
            "provider": s.provider, "model": s.model,
            "waiting": [dataclasses.asdict(w) for w in waiting_calls(s)]}


def session(shown: ShownSession, live_status: str, s: SessionState | None, link: Link | None) -> dict:
    return {"session_id": shown.session_id, "status": live_status, "ok": shown.ok, "problem": shown.problem,
            "goal": s.goal if s else "", "parent": _link(link), "state": state(s) if s else None,
            "events": [event(e) for e in shown.events]}


def tree(found: dict[str, Link], session_id: str, statuses: dict[str, str], goals: dict[str, str]) -> dict:
    """The tree `session_id` belongs to, from its root: nested {session_id, status, goal, kind, seq, children}."""
    root, children = family(found, session_id)

    def node(sid: str, link: Link | None, depth: int, seen: set[str]) -> dict:
        seen.add(sid)
        kids = [node(c.child, c, depth + 1, seen) for c in children.get(sid, []) if c.child not in seen]
        return {"session_id": sid, "status": statuses.get(sid, "unknown"), "goal": goals.get(sid, ""),
                "kind": link.kind if link else "root", "seq": link.parent_seq if link else None,
                "current": sid == session_id, "children": kids}

    return node(root, None, 0, set())


def members(found: dict[str, Link], session_id: str) -> set[str]:
    """The sessions of the tree `session_id` belongs to."""
    root, children = family(found, session_id)
    out, todo = set(), [root]
    while todo:
        sid = todo.pop()
        if sid not in out:
            out.add(sid)
            todo.extend(link.child for link in children.get(sid, []))
    return out


def diff(report: DiffReport) -> dict:
    out = dataclasses.asdict(report)
    out["identical"] = report.identical
    out["text"] = render(report)
    return out


def grades(graded: list[ev.Event]) -> list[dict]:
    """Eval verdicts per suite and variant: trials (sessions), verdicts, passed."""
    groups: dict[tuple[str, str], dict] = {}
    for e in graded:
        p = e.payload
        g = groups.setdefault((p.suite, p.variant), {"suite": p.suite, "variant": p.variant, "sessions": set(),
                                                     "verdicts": 0, "passed": 0, "failing": set()})
        g["sessions"].add(e.session_id)
        g["verdicts"] += 1
        g["passed"] += int(p.passed)
        if not p.passed:
            g["failing"].add(e.session_id)
    return [{**g, "sessions": len(g["sessions"]), "failing": sorted(g["failing"]),
             "pass_rate": g["passed"] / g["verdicts"] if g["verdicts"] else None} for g in groups.values()]
