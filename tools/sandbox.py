"""The sandbox code tools run in: Linux bubblewrap (`bwrap`), per the session's `[sandbox]` policy.

`command(argv, workdir, policy)` gives the argv that runs `argv` inside the sandbox, and
`Limits` the resource limits its process starts with (`preexec`). Modes (docs/sandbox.md):

- `workspace-write` (default): the file system read-only, the workdir writable except its
  `.git` and `.loopstream`, a private `/tmp`, home directories hidden (empty);
- `read-only`: the same with the workdir read-only too;
- `full`: the whole file system writable and home visible (explicit opt-in), still its own
  PID namespace, network setting and limits;
- `none`: no sandbox (the caller runs the command as it is; explicit opt-out).

Every sandbox has its own PID, IPC and UTS namespaces (it sees and can signal only its own
processes, and they all die when the tool's process does: `--die-with-parent`), its own empty
network namespace unless `network = true`, no capabilities (`--cap-drop ALL`), and limits on
address space, file size and CPU time (rlimits) and on processes (a pids cgroup when it can
make one, running as root; else RLIMIT_NPROC, which the kernel does not apply to root).

bwrap missing or not working (no user namespaces) is `SandboxUnavailable`: code tools refuse
to run (ToolFailed `sandbox_unavailable`), never run unsandboxed behind the user's back.
`LOOPSTREAM_BWRAP` names another bwrap binary.
"""
from __future__ import annotations

import functools
import os
import resource
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loopstream.core.policy import Sandbox

PROTECTED = (".git", ".loopstream")  # read-only inside the workdir under workspace-write
BWRAP_ENV = "LOOPSTREAM_BWRAP"
PIDS_CGROUP = Path("/sys/fs/cgroup/pids")  # cgroup v1 pids controller
PIDS_CGROUP_V2 = Path("/sys/fs/cgroup")
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap) "
                "or opt out explicitly with --sandbox none (policy [sandbox] mode = \"none\")")


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot make a sandbox here; the message says why and what to do."""


def bwrap_path() -> str | None:
    named = os.environ.get(BWRAP_ENV)
    if named:
        return named if os.path.isfile(named) and os.access(named, os.X_OK) else None
    return shutil.which("bwrap")


@functools.lru_cache(maxsize=8)
def _probe(bwrap: str) -> str | None:
    """Why `bwrap` cannot make a sandbox (None: it can). Cached per binary."""
    try:
        proc = subprocess.run([bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                               "--unshare-pid", "--unshare-net", "--die-with-parent", "--cap-drop", "ALL",
                               "--", "/bin/true" if os.path.exists("/bin/true") else "true"],
                              capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{bwrap} does not run: {exc}"
    if proc.returncode != 0:
        why = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        return f"{bwrap} cannot make a sandbox here: {why[-1] if why else f'exit code {proc.returncode}'}"
    return None


def check() -> str:
    """The bwrap binary to use, or SandboxUnavailable saying why and how to fix it."""
    bwrap = bwrap_path()
    if bwrap is None:
        where = f"{BWRAP_ENV}={os.environ[BWRAP_ENV]!r} is not an executable file" if os.environ.get(BWRAP_ENV) \
            else "bubblewrap (bwrap) is not installed"
        raise SandboxUnavailable(f"{where}: code tools run only in a sandbox; {INSTALL_HINT}")
    why = _probe(bwrap)
    if why is not None:
        raise SandboxUnavailable(f"{why}; {INSTALL_HINT}")
    return bwrap


def _hidden_dirs() -> list[str]:
    """Home directories the sandbox hides behind an empty tmpfs (except what is bound back)."""
    out = []
    for d in (os.environ.get("HOME", ""), "/root", "/home"):
        if d and os.path.isdir(d) and os.path.realpath(d) not in out and os.path.realpath(d) != "/":
            out.append(os.path.realpath(d))
    return out


def command(argv: list[str], workdir: Path, policy: Sandbox, *, bwrap: str | None = None,
            read_paths: list[str] = ()) -> list[str]:
    """The argv that runs `argv` in `workdir` inside the sandbox `policy` asks for (mode not
    `none`). `read_paths`: further paths made visible read-only (scope's allowed paths)."""
    if policy.mode == "none":
        raise ValueError("mode none has no sandbox")
    bwrap = bwrap or check()
    wd = str(workdir.resolve())
    args = [bwrap]
    if policy.mode == "full":
        args += ["--bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    else:
        args += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        for hidden in _hidden_dirs():
            args += ["--tmpfs", hidden]
        for extra in read_paths:
            real = os.path.realpath(extra)
            if os.path.exists(real):
                args += ["--ro-bind", real, real]
        args += ["--bind" if policy.mode == "workspace-write" else "--ro-bind", wd, wd]
        if policy.mode == "workspace-write":
            for name in PROTECTED:
                inner = os.path.join(wd, name)
                if os.path.lexists(inner) and not os.path.islink(inner):
                    args += ["--ro-bind", inner, inner]
    args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if not policy.network:
        args += ["--unshare-net"]
    args += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", "--chdir", wd, "--", *argv]
    return args


@dataclass
class Limits:
    """The resource limits a sandboxed process starts with; `preexec` applies them in the child
    (before bwrap runs), `close` removes the pids cgroup afterwards."""

    policy: Sandbox
    cgroup: Path | None = None
    _procs_fd: int | None = None

    @classmethod
    def make(cls, policy: Sandbox) -> Limits:
        limits = cls(policy)
        if os.geteuid() == 0:  # RLIMIT_NPROC does not bind root: use a pids cgroup when there is one
            for base in (PIDS_CGROUP, PIDS_CGROUP_V2):
                if not (base / "cgroup.procs").exists() or not os.access(base, os.W_OK):
                    continue
                group = base / "loopstream" / uuid.uuid4().hex[:12]
                try:
                    group.mkdir(parents=True)
                    if base == PIDS_CGROUP_V2:  # cgroup v2: the pids controller must be enabled down to it
                        for parent in (base, base / "loopstream"):
                            _enable_pids(parent)
                    (group / "pids.max").write_text(str(policy.max_processes))
                    limits._procs_fd = os.open(group / "cgroup.procs", os.O_WRONLY)
                    limits.cgroup = group
                    break
                except OSError:
                    _rmdir(group)
        return limits

    @property
    def processes_bounded(self) -> bool:
        return self.cgroup is not None or os.geteuid() != 0

    def wrap(self, argv: list[str]) -> tuple[list[str], Callable[[], None] | None]:
        """`argv` started under the limits: through `prlimit` (util-linux) and, for the pids
        cgroup, `sh` writing its own pid into it before it execs the rest, so the process can be
        spawned without a Python `preexec_fn` (which forces a full fork: ~20 ms more per call).
        Without prlimit, the limits are set in a `preexec_fn` instead (second item)."""
        mib, p = 1 << 20, self.policy
        prlimit = shutil.which("prlimit")
        if prlimit is None:
            return argv, self.preexec()
        limits = [f"--as={p.memory_mb * mib}", f"--fsize={p.file_size_mb * mib}",
                  f"--cpu={p.cpu_seconds}:{p.cpu_seconds + 5}", "--core=0"]
        if os.geteuid() != 0:
            limits.append(f"--nproc={p.max_processes}")
        wrapped = [prlimit, *limits, "--", *argv]
        if self.cgroup is not None:
            wrapped = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.cgroup / "cgroup.procs"), *wrapped]
        return wrapped, None

    def preexec(self) -> Callable[[], None]:
        mib = 1 << 20
        policy, fd = self.policy, self._procs_fd

        def apply() -> None:  # in the child, between fork and exec: no Python objects of ours
            if fd is not None:
                os.write(fd, b"0")  # this process (and all it starts) into the pids cgroup
            resource.setrlimit(resource.RLIMIT_AS, (policy.memory_mb * mib,) * 2)
            resource.setrlimit(resource.RLIMIT_FSIZE, (policy.file_size_mb * mib,) * 2)
            resource.setrlimit(resource.RLIMIT_CPU, (policy.cpu_seconds, policy.cpu_seconds + 5))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if os.geteuid() != 0:
                resource.setrlimit(resource.RLIMIT_NPROC, (policy.max_processes,) * 2)

        return apply

    def close(self) -> None:
        if self._procs_fd is not None:
            os.close(self._procs_fd)
            self._procs_fd = None
        if self.cgroup is not None:
            for pid in _cgroup_pids(self.cgroup):  # anything left (it should all be dead already)
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            group, self.cgroup = self.cgroup, None
            try:
                group.rmdir()
            except OSError:  # the kernel frees it a moment after its last process: do not wait for it here
                threading.Thread(target=_rmdir, args=(group,), daemon=True, name="loopstream-cgroup").start()


def _enable_pids(parent: Path) -> None:
    try:
        (parent / "cgroup.subtree_control").write_text("+pids")
    except OSError:
        pass  # then pids.max is missing and the cgroup is not used


def _cgroup_pids(group: Path) -> list[int]:
    try:
        return [int(x) for x in (group / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _rmdir(group: Path) -> None:
    for _ in range(250):  # the kernel frees a cgroup a moment after its last process exits
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)
