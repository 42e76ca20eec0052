"""Scope control: which paths and commands a tool call may name, checked before it runs.

The session's `[scope]` policy (core/policy.py `Scope`) lists allowed paths and allowed
commands; the tool processor asks `check` before a call runs (before its checkpoint), and a
call outside is ToolFailed `scope_denied` whose message names the rule, so the model is
told why and the log keeps the attempt. Empty lists allow everything (the sandbox still
confines what code can reach). It is a check on what a call *says*: a shell command can
still build a path at run time (`cat $(echo /etc)/passwd`), which is why command
substitution is refused under `allowed_commands`, and why the sandbox (tools/sandbox.py),
not this list, is the boundary.

Paths: a string argument whose name ends in `path` (`path`, `src_path`), and in a `shell`
command every word or redirect target that starts with `/` or `~` or climbs with `..`.
Each must resolve inside the workdir (and match a relative allowed glob, if any are given),
or match an absolute allowed path or glob, or (shell only) lie under a system directory
(`SYSTEM_READ`: programs and libraries, which the sandbox shows read-only).
"""
from __future__ import annotations

import fnmatch
import os
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

from loopstream.core.policy import Scope

SEPARATORS = {";", "&&", "||", "|", "&", "|&", ";;", "(", ")"}
REDIRECTS = {">", ">>", "<", "<<", "<<<", ">&", "<&", "&>", "&>>", ">|"}
SYSTEM_READ = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/dev/null", "/dev/zero", "/dev/urandom",
               "/dev/stdin", "/dev/stdout", "/dev/stderr", "/proc/self")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def active(scope: Scope) -> bool:
    return bool(scope.allowed_paths or scope.allowed_commands)


def check(scope: Scope, tool: str, arguments: dict[str, Any], workdir: Path) -> str | None:
    """Why the call is outside the scope (the message the model reads, naming the rule), or None."""
    if not active(scope):
        return None
    if tool == "shell":
        command = arguments.get("command")
        return _check_shell(scope, command, workdir) if isinstance(command, str) else None
    if scope.allowed_paths:
        for name, value in arguments.items():
            if name.endswith("path") and isinstance(value, str) and (why := _check_path(scope, value, workdir)):
                return why
    return None


def shell_read_paths(scope: Scope, workdir: Path) -> list[str]:
    """Allowed absolute paths (not globs) outside the workdir: the sandbox shows them read-only."""
    out = []
    for p in scope.allowed_paths:
        if p.startswith(("/", "~")) and not any(c in p for c in "*?["):
            real = os.path.realpath(os.path.expanduser(p))
            if not _inside(real, str(workdir.resolve())):
                out.append(real)
    return out


def split_commands(command: str) -> list[list[str]]:
    """The simple commands of a shell line as word lists (operators and redirects kept as words)."""
    lexer = shlex.shlex(command.replace("\n", " ; "), posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    lexer.commenters = ""
    words = list(lexer)
    out, current = [], []
    for w in words:
        if w in SEPARATORS:
            if current:
                out.append(current)
            current = []
        else:
            current.append(w)
    if current:
        out.append(current)
    return out


def _check_shell(scope: Scope, command: str, workdir: Path) -> str | None:
    try:
        commands = split_commands(command)
    except ValueError as exc:
        return f"scope: the command cannot be parsed ({exc}), so it cannot be checked against the scope"
    if scope.allowed_commands:
        if "$(" in command or "`" in command or "<(" in command or ">(" in command:
            return "scope: command substitution ($(…), `…`, <(…)) is not allowed when allowed_commands is set"
        for words in commands:
            simple = " ".join(w for w in _without_assignments(words) if w not in REDIRECTS)
            if not any(_command_matches(p, simple) for p in scope.allowed_commands):
                return (f"scope: command {simple[:200]!r} matches none of allowed_commands "
                        f"{scope.allowed_commands}")
    if scope.allowed_paths:
        for words in commands:
            for w in words:
                target = w.split("=", 1)[1] if _ASSIGNMENT.match(w) else w
                if target in REDIRECTS or not _looks_like_path(target):
                    continue
                if (why := _check_path(scope, target, workdir, system_ok=True)) is not None:
                    return why
    return None


def _without_assignments(words: list[str]) -> list[str]:
    i = 0
    while i < len(words) and _ASSIGNMENT.match(words[i]):
        i += 1
    return words[i:]


def _command_matches(pattern: str, simple: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], simple) is not None
    return fnmatch.fnmatchcase(simple, pattern)


def _looks_like_path(word: str) -> bool:
    return word.startswith(("/", "~")) or ".." in PurePosixPath(word).parts


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _check_path(scope: Scope, value: str, workdir: Path, *, system_ok: bool = False) -> str | None:
    root = str(workdir.resolve())
    real = os.path.realpath(os.path.join(root, os.path.expanduser(value)))
    relative = [p for p in scope.allowed_paths if not p.startswith(("/", "~"))]
    absolute = [os.path.expanduser(p) for p in scope.allowed_paths if p.startswith(("/", "~"))]
    if _inside(real, root):
        rel = os.path.relpath(real, root)
        if not relative or any(fnmatch.fnmatchcase(rel, p) or _inside(rel, p.rstrip("/")) for p in relative):
            return None
        return f"scope: path {value!r} ({rel}) matches none of the allowed paths {scope.allowed_paths}"
    if any(fnmatch.fnmatchcase(real, p) or _inside(real, os.path.realpath(p)) for p in absolute):
        return None
    if system_ok and any(_inside(real, s) for s in SYSTEM_READ):
        return None
    return (f"scope: path {value!r} resolves to {real}, outside the workdir and the allowed paths "
            f"{scope.allowed_paths}")
