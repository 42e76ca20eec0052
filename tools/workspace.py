"""Side-effect tools: write and edit files, run shell commands, in the working directory.

They are not in `default_registry()`: a session gets them only when asked for
(`side_effect_registry()`, `default_registry(allow_writes=True)`, `loopstream run
--allow-writes`). Each is `read_only=False`, so the tool processor snapshots the
workspace (loopstream.tools.checkpoint) and records `WorkspaceCheckpointed` before it runs.

Paths are confined to the working directory (tools/confine.py: symlinks resolved, nothing
outside, no link followed at the moment of writing), and `.git/` and `.loopstream/` (which
checkpoints cannot restore) are refused. `shell` runs `bash -c COMMAND` with the working
directory as cwd and a scrubbed environment, inside the sandbox the session's `[sandbox]`
policy asks for (tools/sandbox.py: bubblewrap, workspace-write by default); with mode `none`
it is a plain shell that can read, write and send anything the user running it can.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

from loopstream.core import cancel
from loopstream.core.secrets import is_secret_name
from loopstream.tools import sandbox
from loopstream.tools.confine import file_size, locate, read_bytes, replace_file
from loopstream.tools.registry import ToolContext, ToolError, ToolRegistry, tool
from loopstream.tools.scope import shell_read_paths

PROTECTED = (".git", ".loopstream")
MAX_OUTPUT_CHARS = 12_000  # shell output kept: the first and the last half of it
MAX_TIMEOUT_S = 600.0
# The environment a shell command gets: these variables, never one that looks secret,
# plus those named in LOOPSTREAM_SHELL_ENV (comma-separated; the user's explicit choice).
SHELL_ENV = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES",
             "TZ", "TMPDIR", "VIRTUAL_ENV")
SHELL_ENV_EXTRA = "LOOPSTREAM_SHELL_ENV"


@tool(read_only=False, idempotent=True)
def write_file(path: str, content: str, ctx: ToolContext) -> str:
    """Create or overwrite a text file (relative to the working directory) with `content`.
    Parent directories are created as needed."""
    old = file_size(ctx, path)
    data = content.encode("utf-8")
    rel = replace_file(ctx, path, data, protected=PROTECTED)
    return f"wrote {len(data)} bytes to {rel}" + (f" (replaced {old} bytes)" if old is not None else " (new file)")


@tool(read_only=False, idempotent=True)
def edit_file(path: str, old: str, new: str, ctx: ToolContext) -> str:
    """Replace the one exact occurrence of `old` in a text file with `new`. `old` must match
    exactly once (whitespace included): include enough surrounding lines to make it unique."""
    if not old:
        raise ToolError("old must not be empty", "invalid_arguments")
    if old == new:
        raise ToolError("old and new are identical: nothing to change", "invalid_arguments")
    rel = locate(ctx, path)
    if rel.parts and rel.parts[0] in PROTECTED:
        raise ToolError(f"refusing to change {rel.parts[0]}/ (checkpoints cannot restore it)", "permission_denied")
    try:
        raw = read_bytes(ctx, path)
    except ToolError as exc:
        if exc.kind == "not_found":
            raise ToolError(f"no such file: {path} (use write_file to create it)", "not_found") from None
        raise
    try:
        text = raw.decode("utf-8")  # bytes as they are: \r\n stays \r\n
    except UnicodeDecodeError:
        raise ToolError(f"{path} is not a UTF-8 text file", "invalid_arguments") from None
    count = text.count(old)
    if count == 0 and "\r\n" in text and "\r\n" not in old:  # the model wrote \n for a CRLF file
        old, new = old.replace("\n", "\r\n"), new.replace("\n", "\r\n")
        count = text.count(old)
    if count == 0:
        raise ToolError(f"old text not found in {rel}; read the file and copy the text exactly", "no_match")
    if count > 1:
        raise ToolError(
            f"old text occurs {count} times in {rel}; include more surrounding text so it matches once",
            "ambiguous_match",
        )
    at = text.index(old)
    replace_file(ctx, path, (text[:at] + new + text[at + len(old):]).encode("utf-8"), protected=PROTECTED)
    line = text.count("\n", 0, at) + 1
    return f"edited {rel}: replaced {old.count(chr(10)) + 1} line(s) at line {line} with {new.count(chr(10)) + 1}"


def shell_env(cwd: Path) -> dict[str, str]:
    extra = [n.strip() for n in os.environ.get(SHELL_ENV_EXTRA, "").split(",") if n.strip()]
    env = {k: os.environ[k] for k in SHELL_ENV if k in os.environ and not is_secret_name(k)}
    env.update({k: os.environ[k] for k in extra if k in os.environ})
    env.setdefault("PATH", os.defpath)
    env.update(PWD=str(cwd), TERM="dumb", PAGER="cat", GIT_PAGER="cat", NO_COLOR="1")
    return env


class _Capture:
    """Drains a pipe in a thread, keeping the first and last `limit / 2` bytes."""

    def __init__(self, stream, limit: int = MAX_OUTPUT_CHARS) -> None:
        self.half = limit // 2
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0
        self._stream = stream
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        try:
            fd = self._stream.fileno()
            while chunk := os.read(fd, 65536):
                self.total += len(chunk)
                room = self.half - len(self.head)
                if room > 0:
                    self.head += chunk[:room]
                    chunk = chunk[room:]
                self.tail += chunk
                if len(self.tail) > 4 * self.half:
                    del self.tail[: len(self.tail) - self.half]
        except OSError:
            pass
        finally:
            self._stream.close()

    def text(self) -> str:
        tail = self.tail[-self.half:] if self.half else b""
        omitted = self.total - len(self.head) - len(tail)
        gap = f"\n…({omitted} bytes omitted)…\n".encode() if omitted > 0 else b""
        return (bytes(self.head) + gap + bytes(tail)).decode("utf-8", errors="replace")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@tool(read_only=False, idempotent=False)
def shell(command: str, ctx: ToolContext, timeout_s: float = 60) -> str:
    """Run a shell command (bash -c) in the working directory, in a sandbox (no network unless
    allowed; only the working directory is writable); returns the exit code and the combined
    stdout+stderr (long output keeps its start and end). It is killed after timeout_s seconds
    (at most 600); background processes are stopped when it returns."""
    if not command.strip():
        raise ToolError("command must not be empty", "invalid_arguments")
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ToolError(f"timeout_s must be between 0 and {MAX_TIMEOUT_S:g}", "invalid_arguments")
    cwd = ctx.workdir.resolve()  # confine-exempt: the sandbox confines shell (tools/sandbox.py)
    if not cwd.is_dir():
        raise ToolError(f"working directory {cwd} does not exist", "not_found")
    env = shell_env(cwd)
    bash = shutil.which("bash", path=env["PATH"]) or "/bin/sh"
    policy = ctx.policy.sandbox
    argv, limits = [bash, "-c", command], None
    if policy.mode != "none":
        try:
            argv = sandbox.command(argv, cwd, policy, read_paths=shell_read_paths(ctx.policy.scope, cwd))
        except sandbox.SandboxUnavailable as exc:
            raise ToolError(f"shell did not run: {exc}", "sandbox_unavailable") from None
        limits = sandbox.Limits.make(policy)
    preexec = None
    if limits is not None:
        argv, preexec = limits.wrap(argv)
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=preexec,
        )
    except BaseException:
        if limits:
            limits.close()
        raise
    try:
        return _wait(proc, timeout_s, limits)
    finally:
        if limits:
            limits.close()


def _wait(proc: subprocess.Popen, timeout_s: float, limits: sandbox.Limits | None) -> str:
    out = _Capture(proc.stdout)
    unregister = cancel.current().on_cancel(lambda: _kill_group(proc))  # the driver stops the work: kill it
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.wait()
        out.thread.join(2)
        raise ToolError(
            f"command timed out after {timeout_s:g}s and was killed; output so far:\n{out.text() or '(none)'}",
            "timeout",
        ) from None
    finally:
        unregister()
    _kill_group(proc)  # whatever it left running in the background
    out.thread.join(2)
    status = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
    if limits is not None and code in (137, -9):
        status += " (a sandbox limit may have stopped it: memory, CPU time, processes)"
    return f"{status}\n{out.text() or '(no output)'}"


TOOLS = [write_file, edit_file, shell]


def side_effect_registry() -> ToolRegistry:
    """Only the side-effect tools (write_file, edit_file, shell): add them to a session on purpose."""
    return ToolRegistry().add(*TOOLS)
