"""Delegation: the pure half of sub-agents (docs/subagents.md).

`Delegation` acts for the tools on a ToolRequested of `delegate` / `spawn_agents`: it checks
the call against the session's recorded `[delegation]` limits (depth, fan-out, task size, the
agents a child may run as) and emits ChildrenStarted, naming each child session by an id
derived from the ToolRequested event (so a redo, a crash and resume, never names another
child), or a ToolFailed `delegation_refused` the model reads. Any other call is left to the
tool processor (it returns nothing).

`decided` and `result_text` are the aggregation rules the child runner applies: all,
first (the first successful child), quorum (that many successful children)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from loopstream.core import events as ev
from loopstream.core.policy import DELEGATION_TOOLS
from loopstream.core.processor import Emit
from loopstream.core.state import Delegation as Open
from loopstream.core.state import SessionState
from loopstream.tools.confine import read_bytes
from loopstream.tools.registry import ToolContext, ToolError

MODES = ("all", "first", "quorum")
SUCCESS = "done"


class Delegation:
    name = "delegation"
    acts_for = "tools"  # a pending tool call: this one takes the delegation tools' calls
    triggers = frozenset({"ToolRequested"})

    def handle(self, event: ev.Event, state: SessionState, now_ms: int) -> list[Emit]:
        p = event.payload
        if p.name not in DELEGATION_TOOLS or p.name not in state.tools:
            return []  # the tool processor's
        try:
            children, mode, quorum = self._plan(event, state)
        except ValueError as exc:
            return [Emit(ev.ToolFailed(call_id=p.call_id, name=p.name, error_kind="delegation_refused",
                                       message=str(exc), latency_ms=0))]
        return [Emit(ev.ChildrenStarted(call_id=p.call_id, mode=mode, quorum=quorum, children=children),
                     key=p.call_id)]

    @staticmethod
    def _plan(event: ev.Event, state: SessionState) -> tuple[list[ev.ChildRecord], str, int]:
        p = event.payload
        limits = state.policy.delegation
        try:
            args = json.loads(p.arguments_json)
        except ValueError:
            raise ValueError("arguments are not JSON") from None
        if not isinstance(args, dict):
            raise ValueError("arguments must be a JSON object")
        if p.name == "delegate":
            tasks, mode, quorum = [{"task": args.get("task"), "agent": args.get("agent")}], "all", None
        elif p.name == "spawn_over":
            tasks, mode, quorum = slice_tasks(args, state), "all", None
        else:
            tasks, mode, quorum = args.get("tasks"), args.get("mode") or "all", args.get("quorum")
        if state.depth >= limits.max_depth:
            raise ValueError(f"depth limit: this session is at depth {state.depth} and delegation.max_depth is "
                             f"{limits.max_depth}; do the task yourself")
        if not isinstance(tasks, list) or not tasks:
            raise ValueError("`tasks` must be a non-empty list of {\"task\": ..., \"agent\": ...}")
        if len(tasks) > limits.max_children:
            raise ValueError(f"fan-out limit: {len(tasks)} tasks, delegation.max_children is {limits.max_children}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {str(mode)[:40]!r}")
        allowed = allowed_agents(state)
        out = []
        for i, item in enumerate(tasks):
            item = {"task": item} if isinstance(item, str) else item
            if not isinstance(item, dict) or not isinstance(item.get("task"), str) or not item["task"].strip():
                raise ValueError(f"task {i}: give a non-empty `task` text")
            task, agent = item["task"], item.get("agent")
            if len(task) > limits.max_task_chars:
                raise ValueError(f"task {i}: {len(task)} characters, delegation.max_task_chars is "
                                 f"{limits.max_task_chars}; give the child a shorter task")
            if agent in (None, "", state.agent):
                agent = state.agent
            elif not isinstance(agent, str) or agent not in allowed:
                known = ", ".join(sorted(allowed | {state.agent}))
                raise ValueError(f"task {i}: agent {str(agent)[:60]!r} is not one this session may start "
                                 f"(known: {known})")
            out.append(ev.ChildRecord(session_id=child_id(event.event_id, state.session_id, i), agent=agent, task=task))
        n = len(out)
        if mode == "quorum":
            quorum = n // 2 + 1 if quorum is None else quorum
            if not isinstance(quorum, int) or isinstance(quorum, bool) or not 1 <= quorum <= n:
                raise ValueError(f"quorum must be an integer from 1 to {n}")
        return out, mode, quorum if mode == "quorum" else (1 if mode == "first" else n)


MAX_SLICED_BYTES = 16 << 20  # a file read for slicing: larger is refused


def slice_tasks(args: dict, state: SessionState) -> list[dict]:
    """spawn_over's children (recursive decomposition, docs/subagents.md): the lines
    start_line..end_line of the file, read inside the workdir (tools/confine.py), cut into
    slices of at most `slice_chars`; each child's task is the instruction and its slice (so
    each slice is an event: the child's goal). When that needs more children than
    `[delegation] max_children`, the range is split into that many ranges and each child is
    asked to call spawn_over on its range and combine, if the depth limit lets it."""
    limits = state.policy.delegation
    path, instruction = args.get("path"), args.get("instruction")
    size, start, end = args.get("slice_chars", 4000), args.get("start_line", 1), args.get("end_line")
    if not isinstance(path, str) or not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("give `path` (a file in the workdir) and an `instruction`")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, start)) or size < 200 or start < 1 \
            or (end is not None and (not isinstance(end, int) or end < start)):
        raise ValueError("slice_chars is an integer of at least 200; start_line from 1; end_line at or after it")
    try:
        data = read_bytes(ToolContext(workdir=Path(state.workdir or "."), policy=state.policy), path, 0,
                          MAX_SLICED_BYTES + 1)
    except (ToolError, OSError) as exc:
        raise ValueError(f"cannot read {path[:200]!r}: {exc}") from None
    if len(data) > MAX_SLICED_BYTES:
        raise ValueError(f"{path[:200]!r} is larger than {MAX_SLICED_BYTES} bytes")
    lines = data.decode("utf-8", errors="replace").splitlines(keepends=True)
    end = len(lines) if end is None else min(end, len(lines))
    if start > end:
        raise ValueError(f"{path[:200]!r} has {len(lines)} lines: nothing in {start}..{end}")
    head = max(0, size - len(instruction) - 200)  # room for the slice in the child's task
    if head < 100:
        raise ValueError("the instruction leaves no room for a slice: raise slice_chars or shorten it")
    slices = _pack(lines, start, end, head)
    if len(slices) <= limits.max_children:
        return [{"task": f"{instruction}\n\n[{path}, lines {a}-{b} of {len(lines)}]\n{text}"}
                for a, b, text in slices]
    if state.depth + 1 >= limits.max_depth:
        raise ValueError(f"lines {start}-{end} of {path[:200]!r} need {len(slices)} slices of {size} characters, "
                         f"more than delegation.max_children ({limits.max_children}), and the depth limit leaves "
                         f"no room to recurse: raise slice_chars")
    per = -(-len(slices) // limits.max_children)  # slices per child range
    ranges = [(slices[i][0], slices[min(i + per, len(slices)) - 1][1]) for i in range(0, len(slices), per)]
    return [{"task": f"{instruction}\n\n[{path}, lines {a}-{b}: too long to read at once. Call spawn_over with "
                     f"path={path!r}, start_line={a}, end_line={b}, slice_chars={size} and this instruction, then "
                     f"combine the results into one answer.]"} for a, b in ranges]


def _pack(lines: list[str], start: int, end: int, size: int) -> list[tuple[int, int, str]]:
    """Lines start..end (1-based) packed greedily into slices of at most `size` characters
    (a longer line is a slice of its own, cut to `size`): (first line, last line, text)."""
    out: list[tuple[int, int, str]] = []
    first, text = start, ""
    for n in range(start, end + 1):
        line = lines[n - 1]
        if text and len(text) + len(line) > size:
            out.append((first, n - 1, text))
            first, text = n, ""
        text += line[:size]
    if text or not out:
        out.append((first, end, text))
    return out


def child_id(requested_event_id: str, session_id: str, index: int) -> str:
    """The session id of the `index`-th child of the delegation caused by that ToolRequested in
    `session_id`. The session is part of it: a fork by reference inherits its parent's
    ToolRequested, id and all, and a fork before the delegation must start fresh children."""
    return ev.derived_id(requested_event_id, session_id, "child", str(index))[:16]


def allowed_agents(state: SessionState) -> set[str]:
    """Agents a child of `state` may run as: the recorded `[delegation] agents`, and the
    `sub_agents` of the recorded agent definition (the parent's own is always allowed)."""
    names = set(state.policy.delegation.agents)
    try:
        definition = json.loads(state.agent_json or "{}")
        subs = definition.get("sub_agents") or definition.get("spec", {}).get("sub_agents") or []
    except (ValueError, AttributeError):
        subs = []
    return names | {s for s in subs if isinstance(s, str)}


def decided(d: Open, settled: dict[int, ev.ChildSettled]) -> bool:
    """Whether the delegation `d` has its result with the children `settled` (index -> result)."""
    n, ok = len(d.children), sum(1 for s in settled.values() if s.status == SUCCESS)
    if len(settled) == n:
        return True
    if d.mode == "all":
        return False
    need = 1 if d.mode == "first" else d.quorum
    return ok >= need or ok + (n - len(settled)) < need  # reached, or out of reach


def result_text(d: Open, settled: dict[int, ev.ChildSettled]) -> str:
    """The delegate call's result, as the model reads it: for `delegate` the child's answer
    (or why it failed); for `spawn_agents` JSON: mode, whether it was met, and each child in
    the order asked with its status, answer or error, tokens and cost."""
    ok = sum(1 for s in settled.values() if s.status == SUCCESS)
    need = {"all": len(d.children), "first": 1}.get(d.mode, d.quorum)
    rows = []
    for i, child in enumerate(d.children):
        s = settled.get(i)
        rows.append({"index": i, "agent": child.agent, "session": child.session_id,
                     "status": s.status if s else "cancelled", "answer" if s and s.status == SUCCESS else "error":
                     s.text if s else "not needed", "tokens": (s.input_tokens + s.output_tokens) if s else 0,
                     "cost_usd": s.cost_usd if s else None})
    return json.dumps({"mode": d.mode, "succeeded": ok, "needed": need, "met": ok >= need, "results": rows},
                      ensure_ascii=False)


def settled_event(d: Open, index: int, status: str, text: str, input_tokens: int = 0, output_tokens: int = 0,
                  cost_usd: float | None = None, steps: int = 0) -> ev.ChildSettled:
    return ev.ChildSettled(call_id=d.call_id, index=index, session_id=d.children[index].session_id, status=status,
                           text=text, input_tokens=input_tokens, output_tokens=output_tokens, cost_usd=cost_usd,
                           steps=steps)


def completed(d: Open, name: str, settled: dict[int, ev.ChildSettled], started: float) -> ev.ToolCompleted:
    """The delegate call's ToolCompleted with the aggregated result (a failed child is a result)."""
    if name == "delegate" and len(d.children) == 1 and 0 in settled:
        s = settled[0]
        text = s.text if s.status == SUCCESS else f"the sub-agent {s.status}: {s.text}"
    else:
        text = result_text(d, settled)
    return ev.ToolCompleted(call_id=d.call_id, name=name, result=text,
                            latency_ms=int((time.monotonic() - started) * 1000))
