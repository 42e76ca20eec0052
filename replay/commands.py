"""CLI-ready entry points: each returns the text to print and the exit code, so the
command line only parses options, opens the log, resolves the session id and prints.

Exit codes: 0 fine; 1 verification failed (broken chain, unreadable event, a divergence,
two sessions differ); 3 a fork needs the side effects acknowledged (--yes). Errors the user
can fix (unknown session, bad seq) raise LogError / ForkError: print them, exit 2.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopstream.core.log import Log
from loopstream.replay.archive import export_session
from loopstream.replay.determinism import check_determinism
from loopstream.replay.diff import diff_reports
from loopstream.replay.diff import render as render_diff
from loopstream.replay.fork import ForkNeedsAcknowledgement, ForkResult, fork
from loopstream.replay.replayer import (
    ModelCall,
    ReplayReport,
    ToolCallView,
    render,
    replay,
)
from loopstream.replay.tree import descendants, tree_lines
from loopstream.tools.registry import ToolRegistry

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NEEDS_ACK = 0, 1, 2, 3


@dataclass
class CommandResult:
    text: str  # for stdout
    exit_code: int
    error: str = ""  # one line for stderr when exit_code != 0
    data: Any = None  # the report / ForkResult, for callers that want more


def replay_command(
    log: Log, session_id: str, to_seq: int | None = None, *, verify_only: bool = False, as_json: bool = False,
    width: int = 100, max_lines: int | None = None,
) -> CommandResult:
    """`loopstream replay SESSION [--to SEQ] [--verify] [--json]`."""
    report = replay(log, session_id, to_seq)
    if as_json:
        text = json.dumps(report_json(report), indent=2, default=str)
    elif verify_only:
        text = report.chain.describe()
    else:
        text = render(report, width=width, max_lines=max_lines)
        if tree := tree_lines(log, session_id):
            text += "\nchildren (replay each with `loopstream replay CHILD`):\n" + "\n".join(tree)
    if report.ok:
        return CommandResult(text, EXIT_OK, data=report)
    bad = report.first_bad_seq
    why = report.chain.reason if not report.chain.ok else report.fold_error
    return CommandResult(text, EXIT_FAILED, f"first bad seq {bad}: {why}", report)


def check_command(log: Log, session_id: str, to_seq: int | None = None) -> CommandResult:
    """`loopstream replay SESSION --check` (or `loopstream check SESSION`): decisions re-made."""
    report = check_determinism(log, session_id, to_seq)
    texts, error = [report.render()], _check_error(report)
    if to_seq is None:  # a whole session: its children too (docs/subagents.md)
        for depth, child in descendants(log, session_id):
            if child.status == "not started":
                continue
            sub = check_determinism(log, child.session_id)
            texts.append("\n".join("  " * depth + line for line in sub.render().splitlines()))
            if error is None and (why := _check_error(sub)) is not None:
                error = f"child {child.session_id}: {why}"
    text = "\n".join(texts)
    return CommandResult(text, EXIT_OK, data=report) if error is None else CommandResult(text, EXIT_FAILED, error, report)


def _check_error(report: Any) -> str | None:
    if report.ok:
        return None
    if report.divergence is not None:
        return f"diverges at seq {report.divergence.seq}: {report.divergence.reason}"
    return report.chain.describe()


def fork_command(
    log: Log, session_id: str, at_seq: int, *, model: str | None = None, provider: str | None = None,
    system_prompt: str | None = None, tools: Sequence[str] | None = None, max_steps: int | None = None,
    message: str | None = None, reason: str = "", yes: bool = False, registry: ToolRegistry | None = None,
    sampling: Mapping[str, Any] | None = None,
) -> CommandResult:
    """`loopstream fork SESSION --at SEQ [--model M] [--provider P] [--system-prompt FILE]
    [--tools a,b] [--max-steps N] [--message TEXT] [--reason TEXT] [--yes] [--run]`.

    The caller runs the child afterwards if asked (--run): build the provider for
    `result.data.state.provider` / `.model` and call Runtime.run_session(child id)."""
    try:
        result = fork(log, session_id, at_seq, model=model, provider=provider, system_prompt=system_prompt,
                      tools=tools, max_steps=max_steps, message=message, reason=reason,
                      acknowledge_side_effects=yes, registry=registry, sampling=sampling)
    except ForkNeedsAcknowledgement as exc:
        return CommandResult(str(exc) + "\n(re-run with --yes to fork anyway)", EXIT_NEEDS_ACK,
                             f"{len(exc.side_effects)} side effect(s) need --yes", exc.side_effects)
    return CommandResult(describe_fork(result), EXIT_OK, data=result)


def describe_fork(result: ForkResult) -> str:
    st = result.state
    lines = [
        f"forked {result.parent_session_id} at seq {result.at_seq} → {result.child_session_id}",
        ((f"  refers to the parent's {result.events_referred} events (nothing copied); parent event hash "
          if result.events_referred else
          f"  copied {result.events_copied} events ({result.bytes_copied:,} bytes); parent event hash ")
         + result.parent_event_hash[:16]),
        (f"  the child is {st.status} at seq {st.seq}: provider={st.provider} model={st.model} "
        f"tools={','.join(st.tools) or '-'} max_steps={st.max_steps}"),
    ]
    if result.overrides:
        lines.append("  overrides: " + ", ".join(f"{k}={v!r}" for k, v in result.overrides.items()))
    if result.message is not None:
        lines.append(f"  message: {result.message!r}")
    for s in result.side_effects:
        lines.append(f"  acknowledged side effect: {s.describe()}")
    lines.append(f"  continue it with: loopstream resume {result.child_session_id}")
    return "\n".join(lines)


def diff_command(log: Log, a: str, b: str, *, width: int = 100) -> CommandResult:
    """`loopstream diff A B`: exit 0 if they behaved the same, 1 if not, or if either
    fails verification (the error names its first bad seq)."""
    reports = replay(log, a), replay(log, b)
    report = diff_reports(*reports)
    text = render_diff(report, width=width)
    for r in reports:
        if not r.ok:
            why = r.chain.reason if not r.chain.ok else r.fold_error
            return CommandResult(text, EXIT_FAILED, f"session {r.session_id} fails verification: "
                                 f"first bad seq {r.first_bad_seq}: {why}", report)
    return CommandResult(text, EXIT_OK if report.identical else EXIT_FAILED, data=report)


def export_command(log: Log, session_id: str, path: str | Path, to_seq: int | None = None) -> CommandResult:
    """`loopstream export SESSION FILE [--to SEQ]`: the stored bytes, for a bug report or a fixture."""
    try:
        n = export_session(log, session_id, path, to_seq=to_seq)
    except OSError as exc:  # a directory, a missing folder, no permission, a full disk
        return CommandResult("", EXIT_USAGE, f"cannot write {path}: {exc.strerror or exc}")
    return CommandResult(f"wrote {n} events of {session_id} to {path}", EXIT_OK)


def report_json(report: ReplayReport) -> dict:
    """A replay report as plain JSON-able data (the timeline, chain, totals, outcome)."""
    st = report.state
    items = []
    for item in report.timeline:
        kind = "model" if isinstance(item, ModelCall) else "tool" if isinstance(item, ToolCallView) else "note"
        items.append({"kind": kind, **dataclasses.asdict(item)})
    return {
        "session_id": report.session_id, "to_seq": report.to_seq, "ok": report.ok,
        "first_bad_seq": report.first_bad_seq, "chain": dataclasses.asdict(report.chain),
        "fold_error": report.fold_error, "status": st.status, "answer": st.answer, "error": st.error,
        "model": st.model, "provider": st.provider, "tools": st.tools,
        "totals": dataclasses.asdict(report.totals), "timeline": items,
        "forked_from": report.forked_from.model_dump() if report.forked_from else None,
    }
