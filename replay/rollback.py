"""Roll a session's workspace back to how it was right after one of its events.

Each side-effect tool call is preceded by a `WorkspaceCheckpointed` event whose commit
holds the workspace as the events before it left it (the tool runs only after the
checkpoint is in the log, and the runtime runs it right after its own checkpoint). So
the workspace as it was right after event S is the first checkpoint at or after S: no
write ran between S and that checkpoint. (At S itself when S is a checkpoint: the
tool had not run yet.) If there is no checkpoint after S, no write ran after S and the
workspace is left as it is.

`rollback` restores those files (rewrites changed ones, brings back deleted ones, deletes
ones created later; the current state is snapshotted first, so a rollback can be undone)
and, unless asked not to, forks the session at S (`loopstream.replay.fork`) so a new
session continues from there with the workspace to match. The log itself is never
rewritten, and the log's own database file is never touched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loopstream.core import events as ev
from loopstream.core.log import Log, SessionNotFound
from loopstream.core.policy import SessionPolicy, recorded_policy
from loopstream.replay.fork import ForkError, fork
from loopstream.tools.builtin import every_tool
from loopstream.tools.checkpoint import Restore, Workspace


class RollbackError(ValueError):
    """The rollback cannot be made as asked (bad seq, checkpoint missing)."""


@dataclass
class RollbackResult:
    session_id: str
    to_seq: int
    workdir: str
    checkpoint_seq: int | None  # the WorkspaceCheckpointed restored from (None: nothing to restore)
    commit: str | None
    restore: Restore | None
    fork_session_id: str | None = None  # the new session that continues from to_seq
    fork_error: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def restored(self) -> bool:
        return self.restore is not None

    @property
    def modified(self) -> list[str]:
        return self.restore.modified if self.restore else []

    @property
    def recreated(self) -> list[str]:
        return self.restore.recreated if self.restore else []

    @property
    def deleted(self) -> list[str]:
        return self.restore.deleted if self.restore else []

    def describe(self) -> str:
        if self.restore is None:
            lines = [(f"no side-effect tool ran after seq {self.to_seq}: the workspace {self.workdir} "
                      "is already as it was then")]
        else:
            r = self.restore
            when = (f" (seq {self.checkpoint_seq}): as it was right after seq {self.to_seq}"
                    if self.checkpoint_seq is not None else "")
            lines = [f"restored {self.workdir} to checkpoint {r.commit[:12]}{when}; {r.changed} file(s) changed"]
            lines += [f"  restored  {p}" for p in r.modified]
            lines += [f"  recreated {p}" for p in r.recreated]
            lines += [f"  deleted   {p}" for p in r.deleted]
            lines += [f"  left alone (protected) {p}" for p in r.skipped]
            lines.append(f"the state before this rollback is checkpoint {r.backup_commit[:12]}")
        lines += [f"warning: {w}" for w in self.warnings]
        if self.fork_session_id:
            lines.append(f"new session {self.fork_session_id} continues from seq {self.to_seq}")
        elif self.fork_error:
            lines.append(f"no new session: {self.fork_error}")
        return "\n".join(lines)


@dataclass(frozen=True)
class RollbackPlan:
    """What a rollback would do, computed without changing any file (to show before asking)."""

    session_id: str
    to_seq: int
    workdir: str
    checkpoint_seq: int | None
    commit: str | None
    changes: list[tuple[str, str]]  # (what, path): "restore" | "recreate" | "delete"

    def describe(self) -> str:
        if self.commit is None:
            return f"no side-effect tool ran after seq {self.to_seq}: no file in {self.workdir} changes"
        if not self.changes:
            return f"{self.workdir} is already as it was right after seq {self.to_seq}: no file changes"
        lines = [f"rollback to seq {self.to_seq} changes {len(self.changes)} file(s) in {self.workdir}:"]
        lines += [f"  {what:<9} {path}" for what, path in self.changes]
        return "\n".join(lines)


def _session(log: Log, session_id: str, to_seq: int) -> tuple[list[ev.Event], SessionPolicy,
                                                              ev.SessionStarted | None]:
    events = log.read(session_id)
    if not events:
        raise SessionNotFound(session_id)
    last = events[-1].seq
    if not 0 <= to_seq <= last:
        raise RollbackError(f"session {session_id} has seqs 0..{last}; cannot roll back to {to_seq}")
    started = next((e.payload for e in events if isinstance(e.payload, ev.SessionStarted)), None)
    policy = recorded_policy(started.config_json if started else "{}")
    return events, policy, started


def _target(events: list[ev.Event], to_seq: int, started: ev.SessionStarted | None,
            workdir: str | Path | None) -> tuple[ev.Event | None, Path]:
    """The first checkpoint at or after `to_seq` (None: no write after it) and the workspace."""
    target = next((e for e in events if isinstance(e.payload, ev.WorkspaceCheckpointed) and e.seq >= to_seq), None)
    where = Path(workdir) if workdir is not None else Path(
        target.payload.workdir if target is not None else (started.workdir if started else ".")
    )
    return target, where


def _workspace(where: Path, policy: SessionPolicy, commit: str, seq: int | None) -> Workspace:
    workspace = Workspace(where, exclude=policy.checkpoint_exclude)
    if not workspace.has(commit):
        at = f" (seq {seq})" if seq is not None else ""
        raise RollbackError(f"checkpoint {commit[:12]}{at} is not in {workspace.git_dir}")
    return workspace


_WHAT = {"D": "delete", "A": "recreate"}


def plan_rollback(log: Log, session_id: str, to_seq: int, *, workdir: str | Path | None = None) -> RollbackPlan:
    """What `rollback(log, session_id, to_seq)` would change, file by file (the current
    files are snapshotted into the checkpoint repository to compare; nothing else is written)."""
    events, policy, started = _session(log, session_id, to_seq)
    target, where = _target(events, to_seq, started, workdir)
    changes: list[tuple[str, str]] = []
    if target is not None:
        workspace = _workspace(where, policy, target.payload.commit, target.seq)
        now = workspace.snapshot(f"before a rollback of session {session_id} to seq {to_seq} (preview)")
        changes = [(_WHAT.get(status, "restore"), path)
                   for status, path in workspace.changes(now.commit, target.payload.commit)]
    return RollbackPlan(session_id, to_seq, str(where.resolve()), target.seq if target is not None else None,
                        target.payload.commit if target is not None else None, changes)


def rollback(
    log: Log,
    session_id: str,
    to_seq: int,
    *,
    workdir: str | Path | None = None,
    fork_session: bool = True,
    reason: str = "",
) -> RollbackResult:
    """Restore the workspace of `session_id` as it was right after event `to_seq`, then
    (if `fork_session` and loopstream.replay.fork is available) fork the session at
    `to_seq`. `workdir` overrides where the workspace is (if it moved)."""
    events, policy, started = _session(log, session_id, to_seq)
    target, where = _target(events, to_seq, started, workdir)
    result = RollbackResult(
        session_id=session_id, to_seq=to_seq, workdir=str(where.resolve()),
        checkpoint_seq=target.seq if target is not None else None,
        commit=target.payload.commit if target is not None else None, restore=None,
    )
    result.warnings += _in_flight(events, to_seq)
    if target is not None:
        workspace = _workspace(where, policy, target.payload.commit, target.seq)
        result.restore = workspace.restore(target.payload.commit, protect=_log_files(log))
    if fork_session:
        _fork(log, session_id, to_seq, result, reason)
    return result


def restore_checkpoint(log: Log, session_id: str, commit: str, *, workdir: str | Path | None = None) -> RollbackResult:
    """Restore the workspace of `session_id` to checkpoint `commit` (any checkpoint of its
    workspace: the one printed by a rollback undoes it). Starts no session."""
    events, policy, started = _session(log, session_id, 0)
    checkpoints = [e.payload.workdir for e in events if isinstance(e.payload, ev.WorkspaceCheckpointed)]
    where = Path(workdir if workdir is not None else checkpoints[-1] if checkpoints
                 else started.workdir if started else ".")
    result = RollbackResult(session_id=session_id, to_seq=events[-1].seq, workdir=str(where.resolve()),
                            checkpoint_seq=None, commit=commit, restore=None)
    result.restore = _workspace(where, policy, commit, None).restore(commit, protect=_log_files(log))
    return result


def _fork(log: Log, session_id: str, to_seq: int, result: RollbackResult, reason: str) -> None:
    why = reason or (f"rollback to seq {to_seq}" + (
        f": workspace restored from checkpoint {result.commit[:12]}" if result.commit else ""))
    try:
        # The side effects after to_seq were undone by the restore: acknowledged.
        forked = fork(log, session_id, to_seq, reason=why, acknowledge_side_effects=True,
                      registry=every_tool())
    except ForkError as exc:
        result.fork_error = str(exc)
        return
    result.fork_session_id = forked.child_session_id


def _in_flight(events: list[ev.Event], to_seq: int) -> list[str]:
    """Side-effect calls that were running across to_seq (checkpointed before it, settled
    after it): what the workspace held at to_seq is not known exactly."""
    checkpointed = {e.payload.call_id: e.seq for e in events if isinstance(e.payload, ev.WorkspaceCheckpointed)}
    out = []
    for e in events:
        p = e.payload
        if (isinstance(p, ev.ToolCompleted | ev.ToolFailed) and p.call_id in checkpointed
                and checkpointed[p.call_id] < to_seq < e.seq):
            out.append(f"{p.name} (call {p.call_id}) was running at seq {to_seq}: the restored "
                       "workspace includes what it changed")
    return out


def _log_files(log: Log) -> list[Path]:
    path = getattr(log, "path", None) or getattr(log, "projection_path", None)
    if path is None:
        return []
    path = Path(path)
    return [path] + [path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal")]
