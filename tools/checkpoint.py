"""Workspace checkpoints: snapshots of a working directory in a private git repository.

Before a side-effect tool runs, the tool processor snapshots the working directory and
records a `WorkspaceCheckpointed` event with the commit; `loopstream.replay.rollback`
restores one. The repository lives at `<workdir>/.loopstream/checkpoints` (a bare git
directory used with `--work-tree`), so the user's own `.git` is never read or touched:

- `.git` and `.loopstream/` (this repository, and the default SQLite log) are never
  snapshotted, nor restored; neither are paths the session excludes (`checkpoint_exclude`
  in the session config, git pathspecs) or that the workdir's `.gitignore` files ignore.
- One linear history per workdir on `refs/heads/checkpoints` keeps every commit reachable.
  A snapshot whose tree equals the last one reuses its commit.
- The user's and system git config are not read (no hooks, signing or excludes of theirs),
  and a lock file serializes snapshots and restores of one workdir across processes.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CHECKPOINT_DIR = Path(".loopstream") / "checkpoints"
REF = "refs/heads/checkpoints"
NEVER = (".git", ".loopstream")  # top-level names never snapshotted or restored
GIT_TIMEOUT_S = 300


class CheckpointError(RuntimeError):
    """A snapshot or restore could not be made (git missing, not a directory, git failed)."""


@dataclass(frozen=True)
class Snapshot:
    commit: str
    files_changed: int  # files that differ from the previous checkpoint (every file for the first)


@dataclass
class Restore:
    """What a restore changed in the working directory (paths relative to it)."""

    commit: str
    backup_commit: str  # the workspace as it was just before the restore (restore it to undo)
    modified: list[str] = field(default_factory=list)  # rewritten with their earlier content
    recreated: list[str] = field(default_factory=list)  # deleted since, brought back
    deleted: list[str] = field(default_factory=list)  # created since, removed
    skipped: list[str] = field(default_factory=list)  # protected or outside the workdir: left alone

    @property
    def changed(self) -> int:
        return len(self.modified) + len(self.recreated) + len(self.deleted)


class Workspace:
    """The checkpoint repository of one working directory."""

    def __init__(self, workdir: str | Path, exclude: Iterable[str] = (), git_dir: str | Path | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.git_dir = Path(git_dir).resolve() if git_dir else self.workdir / CHECKPOINT_DIR
        self.exclude = [p for p in exclude if p]

    # -- git plumbing --------------------------------------------------------------
    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        env.update(
            GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_TERMINAL_PROMPT="0",
            GIT_AUTHOR_NAME="loopstream", GIT_AUTHOR_EMAIL="loopstream@localhost",
            GIT_COMMITTER_NAME="loopstream", GIT_COMMITTER_EMAIL="loopstream@localhost",
            LC_ALL="C",
        )
        env.update(extra)
        return env

    def _run(self, args: Sequence[str], stdin: bytes | None = None, **env: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
                ["git", *args], input=stdin, capture_output=True, cwd=self.workdir, env=self._env(**env),
                timeout=GIT_TIMEOUT_S, check=False,
            )
        except FileNotFoundError:
            raise CheckpointError("git is not installed (workspace checkpoints need it)") from None
        except subprocess.TimeoutExpired:
            raise CheckpointError(f"git {args[0]} took longer than {GIT_TIMEOUT_S}s") from None

    def _git(self, *args: str, stdin: bytes | None = None, ok: Sequence[int] = (0,), **env: str) -> bytes:
        done = self._run([f"--git-dir={self.git_dir}", f"--work-tree={self.workdir}", *args], stdin, **env)
        if done.returncode not in ok:
            message = done.stderr.decode(errors="replace").strip() or f"exit code {done.returncode}"
            raise CheckpointError(f"git {args[0]} failed: {message}")
        return done.stdout

    def _init(self) -> None:
        if not self.workdir.is_dir():
            raise CheckpointError(f"working directory {self.workdir} does not exist")
        if (self.git_dir / "HEAD").exists():
            return
        self.git_dir.parent.mkdir(parents=True, exist_ok=True)
        done = self._run(["init", "--quiet", "--bare", "--template=", str(self.git_dir)])
        if done.returncode:
            raise CheckpointError(f"git init failed: {done.stderr.decode(errors='replace').strip()}")
        for key, value in (("core.autocrlf", "false"), ("core.quotePath", "false"), ("gc.auto", "0")):
            self._git("config", key, value)
        self._git("symbolic-ref", "HEAD", REF)
        info = self.git_dir / "info"
        info.mkdir(exist_ok=True)
        (info / "exclude").write_text("".join(f"/{name}/\n" for name in NEVER))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._init()
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: git's own index.lock still guards
            yield
            return
        with open(self.git_dir / "loopstream.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _excludes_file(self) -> str:
        """The session's exclude patterns (gitignore syntax) as git's core.excludesFile; when
        they change, the index starts afresh so newly excluded files leave the snapshot."""
        path = self.git_dir / "loopstream-exclude"
        text = "".join(f"{p}\n" for p in self.exclude)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            (self.git_dir / "index").unlink(missing_ok=True)
        return str(path)

    def _head(self) -> str | None:
        out = self._git("rev-parse", "-q", "--verify", f"{REF}^{{commit}}", ok=(0, 1)).strip()
        return out.decode() or None

    def _names(self, *args: str) -> list[str]:
        return [p for p in self._git(*args).decode("utf-8", "surrogateescape").split("\0") if p]

    # -- public --------------------------------------------------------------------
    def snapshot(self, message: str = "checkpoint") -> Snapshot:
        """Commit the working directory as it is now; returns the commit and the change count."""
        with self._locked():
            return self._snapshot(message)

    def _snapshot(self, message: str) -> Snapshot:
        self._git("-c", f"core.excludesFile={self._excludes_file()}", "add", "--all", "--", ".")
        tree = self._git("write-tree").decode().strip()
        parent = self._head()
        if parent is not None:
            if self._git("rev-parse", f"{parent}^{{tree}}").decode().strip() == tree:
                return Snapshot(parent, 0)
            changed = len(self._names("diff-tree", "-r", "-z", "--no-renames", "--name-only", parent, tree))
        else:
            changed = len(self._names("ls-tree", "-r", "-z", "--name-only", tree))
        args = ["commit-tree", tree, "-m", message] + (["-p", parent] if parent else [])
        commit = self._git(*args).decode().strip()
        self._git("update-ref", REF, commit, *([parent] if parent else []))
        return Snapshot(commit, changed)

    def has(self, commit: str) -> bool:
        if not (self.git_dir / "HEAD").exists():
            return False
        return self._run([f"--git-dir={self.git_dir}", "cat-file", "-e", f"{commit}^{{commit}}"]).returncode == 0

    def changes(self, old: str, new: str) -> list[tuple[str, str]]:
        """(status, path) for each file that differs between two checkpoints: A, D, M, T."""
        fields = self._names("diff-tree", "-r", "-z", "--no-renames", "--name-status", old, new)
        return list(zip(fields[0::2], fields[1::2]))

    def restore(self, commit: str, protect: Iterable[str | Path] = ()) -> Restore:
        """Make the working directory match checkpoint `commit`: rewrite changed files,
        bring back deleted ones, delete files created since. Snapshots the current state
        first (`Restore.backup_commit`), so a restore can itself be undone."""
        protected = {os.path.realpath(p) for p in protect}
        with self._locked():
            if not self.has(commit):
                raise CheckpointError(f"checkpoint {commit[:12]} is not in {self.git_dir}")
            backup = self._snapshot(f"before restoring {commit[:12]}")
            result = Restore(commit=commit, backup_commit=backup.commit)
            writes: list[str] = []
            for status, path in self.changes(backup.commit, commit):
                target = self.workdir / path
                if not self._inside(target) or os.path.realpath(target) in protected:
                    result.skipped.append(path)
                    continue
                if status == "D":  # exists now, not in the checkpoint: created since
                    self._delete(target)
                    result.deleted.append(path)
                else:
                    writes.append(path)
                    (result.recreated if status == "A" else result.modified).append(path)
            if writes:
                with tempfile.TemporaryDirectory() as tmp:
                    index = os.path.join(tmp, "index")
                    self._git("read-tree", commit, GIT_INDEX_FILE=index)
                    self._git("checkout-index", "-f", "-z", "--stdin",
                              stdin=b"\0".join(p.encode("utf-8", "surrogateescape") for p in writes),
                              GIT_INDEX_FILE=index)
            return result

    def _inside(self, target: Path) -> bool:
        parent = Path(os.path.realpath(target.parent))
        return parent == self.workdir or self.workdir in parent.parents

    def _delete(self, target: Path) -> None:
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():  # a nested repository recorded as a gitlink: leave its content alone
            return
        parent = target.parent
        while parent != self.workdir and self.workdir in parent.parents:
            try:
                parent.rmdir()  # only when empty
            except OSError:
                break
            parent = parent.parent


def checkpoint_repo(workdir: str | Path) -> Path:
    """Where the checkpoints of `workdir` are kept."""
    return Path(workdir).resolve() / CHECKPOINT_DIR
