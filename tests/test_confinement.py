"""Every file tool stays inside --workdir: symlinks to files and directories outside, `..`,
absolute paths, special files, and a path swapped for a link between the check and the use
(tools/confine.py). `shell` is not confined: it is a shell, not a sandbox."""
from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from loopstream.core.policy import Sandbox, SessionPolicy
from loopstream.tools import ToolContext, ToolError, default_registry
from loopstream.tools import confine as confine_mod
from loopstream.tools.confine import locate

SECRET = "TOP-SECRET-outside-the-workdir"
TOOLS_DIR = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture
def work(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(f"{SECRET}\n")
    root = tmp_path / "work"
    root.mkdir()
    (root / "notes.txt").write_text("inside notes\n")
    (root / "sub").mkdir()
    (root / "sub" / "a.txt").write_text("inside a\n")
    (root / "file_link").symlink_to(outside / "secret.txt")  # a link to a file outside
    (root / "dir_link").symlink_to(outside)  # a link to a directory outside
    (root / "inner_link").symlink_to(root / "notes.txt")  # a link that stays inside
    return root


@pytest.fixture
def ctx(work: Path) -> ToolContext:
    return ToolContext(workdir=work)


def call(name: str, args: dict, ctx: ToolContext) -> str:
    return default_registry(allow_writes=True).call(name, args, ctx)


ESCAPES = ["file_link", "dir_link/secret.txt", "../outside/secret.txt", "sub/../../outside/secret.txt",
           "PLACEHOLDER_ABSOLUTE"]


def escape_path(path: str, work: Path) -> str:
    return str(work.parent / "outside" / "secret.txt") if path == "PLACEHOLDER_ABSOLUTE" else path


@pytest.mark.parametrize("path", ESCAPES)
@pytest.mark.parametrize(("tool", "args"), [
    ("read_file", {}),
    ("grep", {"pattern": "SECRET"}),
    ("list_dir", {}),
    ("write_file", {"content": "overwritten"}),
    ("edit_file", {"old": "TOP", "new": "BOTTOM"}),
])
def test_no_file_tool_reaches_outside_the_workdir(ctx, work, tool, args, path) -> None:
    target = escape_path(path, work)
    with pytest.raises(ToolError) as info:
        call(tool, {**args, "path": target}, ctx)
    assert info.value.kind == "permission_denied", info.value
    assert SECRET not in str(info.value)
    assert (work.parent / "outside" / "secret.txt").read_text() == f"{SECRET}\n"  # untouched
    assert sorted(p.name for p in (work.parent / "outside").iterdir()) == ["secret.txt"]


@pytest.mark.parametrize("path", ["dir_link", "dir_link/", "..", "/", "PLACEHOLDER_DIR"])
def test_directory_tools_refuse_directories_outside(ctx, work, path) -> None:
    target = str(work.parent / "outside") if path == "PLACEHOLDER_DIR" else path
    for tool, args in (("list_dir", {}), ("grep", {"pattern": "."})):
        with pytest.raises(ToolError) as info:
            call(tool, {**args, "path": target}, ctx)
        assert info.value.kind == "permission_denied"


def test_a_directory_walk_does_not_follow_links_out(ctx, work) -> None:
    """The reported hole: grep returned lines of /etc/passwd through a link in the workdir."""
    (work / "passwd").symlink_to("/etc/passwd")
    assert call("grep", {"pattern": "SECRET|root"}, ctx) == "(no matches)"
    assert call("grep", {"pattern": "inside"}, ctx) == "notes.txt:1: inside notes\nsub/a.txt:1: inside a"
    listing = call("list_dir", {}, ctx).splitlines()
    assert listing == ["dir_link@", "file_link@", "inner_link@", "notes.txt", "passwd@", "sub/"]


def test_links_that_stay_inside_work(ctx, work) -> None:
    assert call("read_file", {"path": "inner_link"}, ctx) == "inside notes\n"
    assert call("grep", {"pattern": "notes", "path": "inner_link"}, ctx) == "notes.txt:1: inside notes"
    call("write_file", {"path": "inner_link", "content": "rewritten\n"}, ctx)
    assert (work / "notes.txt").read_text() == "rewritten\n" and (work / "inner_link").is_symlink()
    call("edit_file", {"path": "inner_link", "old": "rewritten", "new": "edited"}, ctx)
    assert (work / "notes.txt").read_text() == "edited\n"


def test_a_symlink_loop_is_refused_not_a_crash(ctx, work) -> None:
    (work / "loop_a").symlink_to(work / "loop_b")
    (work / "loop_b").symlink_to(work / "loop_a")
    for tool, args in (("read_file", {}), ("write_file", {"content": "x"}), ("list_dir", {})):
        with pytest.raises(ToolError) as info:
            call(tool, {**args, "path": "loop_a"}, ctx)
        assert info.value.kind == "permission_denied"


def test_special_files_are_refused_without_blocking(ctx, work) -> None:
    os.mkfifo(work / "fifo")  # opening it for real would block until a writer came
    for tool, args in (("read_file", {}), ("write_file", {"content": "x"}), ("edit_file", {"old": "a", "new": "b"})):
        with pytest.raises(ToolError) as info:
            call(tool, {**args, "path": "fifo"}, ctx)
        assert info.value.kind == "permission_denied" and "not a regular file" in str(info.value)
    assert "fifo" in call("list_dir", {}, ctx).splitlines()
    assert call("grep", {"pattern": "."}, ctx).count("\n") == 1  # notes.txt and sub/a.txt; the FIFO skipped


def test_a_nul_byte_in_a_path_is_a_tool_error(ctx) -> None:
    with pytest.raises(ToolError) as info:
        call("read_file", {"path": "notes.txt\0.png"}, ctx)
    assert info.value.kind == "invalid_arguments"


# -- a path swapped for a link between the check and the use ---------------------------
def swap_for_link(path: Path, to: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    else:
        path.unlink()
    path.symlink_to(to)


def test_a_directory_swapped_for_a_link_after_the_check_is_not_followed(ctx, work) -> None:
    """Deterministic: the path is checked (`locate`), then `sub` becomes a link outside, then
    the tool's open runs: it refuses instead of reading or writing outside."""
    rel = locate(ctx, "sub/a.txt")
    (work.parent / "outside" / "a.txt").write_text(f"{SECRET}\n")
    swap_for_link(work / "sub", work.parent / "outside")
    with pytest.raises(ToolError) as read:
        confine_mod._open(ctx, rel)
    with pytest.raises(ToolError) as write:
        confine_mod._replace(ctx, rel, b"overwritten")
    assert read.value.kind == write.value.kind == "permission_denied"
    assert (work.parent / "outside" / "a.txt").read_text() == f"{SECRET}\n"


def test_a_file_swapped_for_a_link_after_the_check_is_not_followed(ctx, work) -> None:
    rel = locate(ctx, "notes.txt")
    swap_for_link(work / "notes.txt", work.parent / "outside" / "secret.txt")
    with pytest.raises(ToolError) as info:
        confine_mod._open(ctx, rel)
    with pytest.raises(ToolError) as write:
        confine_mod._replace(ctx, rel, b"replaced\n")
    assert info.value.kind == write.value.kind == "permission_denied"
    assert (work.parent / "outside" / "secret.txt").read_text() == f"{SECRET}\n"


def test_a_directory_moved_out_after_it_was_opened_is_refused(ctx, work) -> None:
    """The opened descriptor's real path is checked too (via /proc/self/fd)."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc")
    fd = os.open(work / "sub", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(work / "sub", work.parent / "outside" / "moved")
        with pytest.raises(ToolError) as info:
            confine_mod._check_inside(fd, work.resolve(), locate(ctx, "."))
        assert info.value.kind == "permission_denied"
    finally:
        os.close(fd)


@pytest.mark.parametrize(("tool", "args"), [
    ("read_file", {"path": "flip/a.txt"}),
    ("grep", {"pattern": "SECRET|inside", "path": "."}),
    ("list_dir", {"path": "flip"}),
    ("write_file", {"path": "flip/a.txt", "content": "written"}),
    ("edit_file", {"path": "flip/a.txt", "old": "inside", "new": "edited"}),
])
def test_tools_under_a_racing_swap_never_cross_the_line(ctx, work, tool, args) -> None:
    """Real threads: `flip` keeps turning from a directory into a link outside and back
    while the tool runs again and again. Whatever each call returns, it never shows or
    changes anything outside. (How often the swap lands inside the window varies; the
    deterministic tests above pin that case.)"""
    outside = work.parent / "outside"
    (outside / "a.txt").write_text(f"{SECRET}\n")
    flip, stop = work / "flip", threading.Event()

    def flipper() -> None:
        while not stop.is_set():
            try:
                flip.mkdir()
                (flip / "a.txt").write_text("inside\n")
                time.sleep(0.0002)
                swap_for_link(flip, outside)
                time.sleep(0.0002)
                flip.unlink()
            except OSError:
                pass  # the tool created or removed something meanwhile

    thread = threading.Thread(target=flipper, daemon=True)
    thread.start()
    outcomes: dict[str, int] = {}
    deadline = time.monotonic() + 2.0
    try:
        for _ in range(3000):
            if time.monotonic() > deadline:
                break
            try:
                out = call(tool, args, ctx)
                assert SECRET not in out, out
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except ToolError as exc:
                assert SECRET not in str(exc)
                outcomes[exc.kind] = outcomes.get(exc.kind, 0) + 1
    finally:
        stop.set()
        thread.join(5)
    assert (outside / "a.txt").read_text() == f"{SECRET}\n"
    assert sorted(p.name for p in outside.iterdir()) == ["a.txt", "secret.txt"], list(outside.iterdir())
    print(f"{tool}: {outcomes}")


# -- one confinement function for every file tool -------------------------------------
def test_file_tools_touch_files_only_through_confine() -> None:
    """Present and future: no tool module opens, walks or resolves paths by itself."""
    direct = re.compile(r"\bopen\(|\.read_(text|bytes)\(|\.write_(text|bytes)\(|os\.walk|\.iterdir\(|\.rglob\(|"
                        r"\.glob\(|os\.scandir|\.resolve\(|os\.(remove|unlink|rename|replace|mkdir|makedirs)\(")
    exempt = {"confine.py",  # the one place
              "checkpoint.py",  # the workspace snapshot (git), not a tool the model calls
              "registry.py", "arithmetic.py", "builtin.py", "__init__.py",
              "sandbox.py",  # builds bwrap's mounts and a pids cgroup: opens no file a model names
              "scope.py"}  # resolves the paths a call names to check them: opens nothing
    offenders = {}
    for module in TOOLS_DIR.glob("*.py"):
        if module.name in exempt:
            continue
        lines = [n for n, line in enumerate(module.read_text().splitlines(), 1)
                 if direct.search(line) and "confine-exempt" not in line]
        if lines:
            offenders[module.name] = lines
    assert offenders == {}, f"file access outside tools/confine.py: {offenders}"


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (apt-get install bubblewrap)")
def test_shell_is_not_confined_and_says_so(ctx, work) -> None:
    """shell is not confined by confine.py but by the sandbox (tests/test_sandbox.py); with the
    sandbox turned off (`none`) it runs with the user's rights."""
    out = call("shell", {"command": "cat ../outside/secret.txt"}, ctx)
    assert SECRET not in out  # the sandbox: the workdir's parent is not there
    bare = ToolContext(workdir=ctx.workdir, policy=SessionPolicy(sandbox=Sandbox(mode="none")))
    assert SECRET in call("shell", {"command": "cat ../outside/secret.txt"}, bare)
    shell = default_registry(allow_writes=True).tools["shell"]
    assert "not a sandbox" in (confine_mod.__doc__ or "") and "shell" in (confine_mod.__doc__ or "")
    assert shell.read_only is False and shell.idempotent is False
