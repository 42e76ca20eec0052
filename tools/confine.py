"""The one way a tool touches a file: confined to the session's working directory.

`locate` resolves a path the model gave (symlinks, `..`) and refuses anything that ends
outside the working directory. Everything after that goes through file descriptors that
cannot be redirected: each directory is opened relative to the previous one with
O_NOFOLLOW, the file itself with O_NOFOLLOW | O_NONBLOCK, and the opened descriptor's real
path is checked again. So a path swapped for a symbolic link between the check and the use
(a race) is refused, not followed; a FIFO, a device or a socket is refused, not opened for
real (which could block forever). Directory walks (`walk_files`, `entries`) never follow a
link. `shell` is not confined by any of this (this module is not a sandbox): it runs under
bubblewrap instead (tools/sandbox.py).
"""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from loopstream.tools.registry import ToolContext, ToolError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _denied(message: str) -> ToolError:
    return ToolError(message, "permission_denied")


def root_of(ctx: ToolContext) -> Path:
    """The working directory, resolved."""
    try:
        return ctx.workdir.resolve(strict=True)
    except (OSError, RuntimeError):
        raise ToolError(f"working directory {ctx.workdir} does not exist", "not_found") from None


def locate(ctx: ToolContext, path: str) -> PurePosixPath:
    """`path` resolved (symlinks followed, `..` applied) relative to the working directory;
    ToolError permission_denied when it ends outside. `.` is the working directory itself."""
    if "\0" in path:
        raise ToolError("path contains a NUL character", "invalid_arguments")
    root = root_of(ctx)
    try:
        target = (root / path).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise _denied(f"path {path!r} cannot be resolved: {exc}") from None
    if target != root and root not in target.parents:
        raise _denied(f"path {path!r} is outside the working directory")
    return PurePosixPath(target.relative_to(root).as_posix())


def _check_inside(fd: int, root: Path, rel: PurePosixPath) -> None:
    """The opened descriptor is still inside the working directory (a directory on the way
    may have been moved out since `locate`)."""
    try:
        real = Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return  # no /proc: the O_NOFOLLOW walk alone keeps links out
    if real != root and root not in real.parents:
        raise _denied(f"{rel} moved outside the working directory during the call")


def _open_dir_fd(root: Path, parts: tuple[str, ...], create: bool = False) -> int:
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts:
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, dir_fd=fd)
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _raced(rel: PurePosixPath, exc: OSError) -> ToolError:
    """An OSError from the descriptor walk of a path `locate` had resolved."""
    if isinstance(exc, FileNotFoundError):
        return ToolError(f"no such file or directory: {rel}", "not_found")
    if isinstance(exc, NotADirectoryError) or exc.errno == getattr(os, "ELOOP", 40):
        return _denied(f"{rel} is or became a symbolic link or a file on the way; not followed")
    return ToolError(f"{rel}: {exc.strerror or exc}", "tool_error")


def _open(ctx: ToolContext, rel: PurePosixPath) -> tuple[int, int]:
    """(descriptor, st_mode) of `rel` opened without following any link, and checked inside."""
    root = root_of(ctx)
    try:
        if not rel.parts:
            fd = os.open(root, _DIR_FLAGS)
        else:
            parent = _open_dir_fd(root, rel.parts[:-1])
            try:  # never open a device at all (opening one can have effects); fstat below re-checks
                if not _plain(os.stat(rel.name, dir_fd=parent, follow_symlinks=False).st_mode):
                    raise _denied(f"{rel} is not a regular file (a FIFO, device or socket)")
                fd = os.open(rel.name, os.O_RDONLY | _FILE_FLAGS, dir_fd=parent)
            finally:
                os.close(parent)
    except OSError as exc:
        raise _raced(rel, exc) from None
    try:
        mode = os.fstat(fd).st_mode
        if not _plain(mode):
            raise _denied(f"{rel} is not a regular file (a FIFO, device or socket)")
        _check_inside(fd, root, rel)
        return fd, mode
    except BaseException:
        os.close(fd)
        raise


def _plain(mode: int) -> bool:
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)  # a link: O_NOFOLLOW refuses it


def _open_file(ctx: ToolContext, path: str) -> int:
    rel = locate(ctx, path)
    fd, mode = _open(ctx, rel)
    if stat.S_ISDIR(mode):
        os.close(fd)
        raise ToolError(f"{path} is a directory", "invalid_arguments")
    return fd


def read_bytes(ctx: ToolContext, path: str, offset: int = 0, limit: int | None = None) -> bytes:
    """Up to `limit` bytes of a regular file inside the working directory, from `offset`."""
    with os.fdopen(_open_file(ctx, path), "rb") as f:
        f.seek(max(0, offset))
        return f.read() if limit is None else f.read(max(0, limit))


def file_size(ctx: ToolContext, path: str) -> int | None:
    """The size of a regular file inside the working directory, or None if there is none."""
    try:
        fd = _open_file(ctx, path)
    except ToolError as exc:
        if exc.kind == "not_found":
            return None
        raise
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def entries(ctx: ToolContext, path: str) -> list[tuple[str, str]]:
    """(name, kind) of a directory's entries, sorted; kind is `dir`, `file`, `link` or `other`.
    Links are reported, never followed."""
    fd, mode = _open(ctx, locate(ctx, path))
    try:
        if not stat.S_ISDIR(mode):
            raise ToolError(f"{path} is not a directory", "not_found")
        with os.scandir(fd) as it:
            found = [(e.name, "link" if e.is_symlink() else "dir" if e.is_dir(follow_symlinks=False)
                      else "file" if e.is_file(follow_symlinks=False) else "other") for e in it]
    finally:
        os.close(fd)
    return sorted(found)


def walk_files(ctx: ToolContext, path: str, max_bytes: int) -> Iterator[tuple[PurePosixPath, bytes]]:
    """(path relative to the working directory, the first `max_bytes`) of every regular file
    under `path`, in sorted order, skipping hidden directories; links and special files are
    skipped, never followed. A `path` that is a regular file yields just that file."""
    rel = locate(ctx, path)
    fd, mode = _open(ctx, rel)
    if stat.S_ISREG(mode):
        with os.fdopen(fd, "rb") as f:
            yield rel, f.read(max_bytes)
        return
    try:
        for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=fd, follow_symlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                data = _read_at(dirfd, name, max_bytes)
                if data is not None:
                    yield rel / os.path.normpath(os.path.join(dirpath, name)), data
    finally:
        os.close(fd)


def _read_at(dirfd: int, name: str, max_bytes: int) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | _FILE_FLAGS, dir_fd=dirfd)
    except OSError:
        return None  # a link (O_NOFOLLOW), gone, or unreadable
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, max_bytes)
    except OSError:
        return None
    finally:
        os.close(fd)


def replace_file(ctx: ToolContext, path: str, data: bytes, *, protected: tuple[str, ...] = ()) -> PurePosixPath:
    """Write `data` as the whole content of a file inside the working directory, atomically (a
    temporary file in the same directory, then rename), keeping an existing file's mode.
    Parent directories are created. The top-level names in `protected` are refused."""
    rel = locate(ctx, path)
    if not rel.parts:
        raise ToolError("path must name a file inside the working directory", "invalid_arguments")
    if rel.parts[0] in protected:
        raise _denied(f"refusing to change {rel.parts[0]}/ (checkpoints cannot restore it)")
    _replace(ctx, rel, data)
    return rel


def _replace(ctx: ToolContext, rel: PurePosixPath, data: bytes) -> None:
    root = root_of(ctx)
    try:
        parent = _open_dir_fd(root, rel.parts[:-1], create=True)
    except OSError as exc:
        raise _raced(rel, exc) from None
    try:
        _check_inside(parent, root, rel)
        _replace_at(parent, rel, data)
    except OSError as exc:  # the directory went away meanwhile, the disk is full, …
        raise _raced(rel, exc) from None
    finally:
        os.close(parent)


def _replace_at(parent: int, rel: PurePosixPath, data: bytes) -> None:
    try:
        old = os.stat(rel.name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    else:
        if stat.S_ISDIR(old.st_mode):
            raise ToolError(f"{rel} is a directory", "invalid_arguments")
        if stat.S_ISLNK(old.st_mode):  # `locate` resolved every link: this one came since
            raise _denied(f"{rel} became a symbolic link during the call; not followed")
        if not stat.S_ISREG(old.st_mode):
            raise _denied(f"{rel} is not a regular file")
        mode = stat.S_IMODE(old.st_mode)
    tmp = f".{rel.name}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, 0o600, dir_fd=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, rel.name, src_dir_fd=parent, dst_dir_fd=parent)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=parent)
        except OSError:
            pass
        raise


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022
