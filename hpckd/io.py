"""Atomic file writes: write to a temp file in the same folder, fsync, then rename.

A reader (or a job killed half-way) never sees a half-written checkpoint, result or cache: either the old
file or the new one is there. The renamed file gets the permissions a plain ``open()`` would give it
(``0o666`` less the umask): ``mkstemp`` creates ``0600`` files, which colleagues on a shared cluster could not read.

File-system failures a user can fix (full disk, read-only disk, no permission, a file where a folder belongs)
become one-line :class:`WriteError` s naming the path; :func:`check_output_dir` finds them before a run loads
its data.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, IO

from hpckd.errors import UserError

TEMP_SUFFIX = ".tmp"


class WriteError(UserError, OSError):
    """A file or folder could not be written: full or read-only disk, no permission, a file in the way.

    Also an :class:`OSError` (with the original ``errno``), so code that falls back on a write failure (the
    index cache tries the next location) keeps doing so."""


# What the user can act on, by errno; anything else (EIO, a bug) keeps its traceback.
_WRITE_PROBLEMS = {
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "permission denied; write elsewhere or fix the folder's permissions",
    errno.EPERM: "permission denied; write elsewhere or fix the folder's permissions",
    errno.ENOTDIR: "a parent of it is a file, not a folder",
    errno.EEXIST: "a parent of it is a file, not a folder",
}

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``).

    ``os.umask`` can only be read by setting it; another thread creating a file in between would get the
    temporary value, so that fallback holds a lock and restores the mask at once."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def as_write_error(path: str | os.PathLike, exc: OSError) -> WriteError | None:
    """The one-line error for a user-fixable ``exc`` met while writing ``path``, else None."""
    problem = _WRITE_PROBLEMS.get(exc.errno or 0)
    if problem is None:
        return None
    error = WriteError(f"cannot write {path}: {problem}")
    error.errno = exc.errno
    return error


def temp_folder_beside(path: str | os.PathLike, prefix: str) -> Path:
    """A new temp folder next to ``path`` (same file system, so it can be renamed over it), its parent made first;
    a full or read-only disk (or no permission) raises a one-line :class:`WriteError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=path.parent))
    except OSError as exc:
        error = as_write_error(path, exc)
        if error is None:
            raise
        raise error from exc


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file next to ``path``; on clean exit fsync it, give it the umask's permissions and rename it
    over ``path``. A full or read-only disk (or no permission) raises a one-line :class:`WriteError`; the temp
    file is removed either way, so ``path`` is the old file or the new one, never a partial one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        error = as_write_error(path, exc)
        if error is None:
            raise
        raise error from exc
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        error = as_write_error(path, exc) if isinstance(exc, OSError) else None
        if error is None:
            raise
        raise error from exc
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the directory entry is flushed.
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def remove_stale_temp_files(folder: str | os.PathLike, pattern: str = f".*{TEMP_SUFFIX}") -> list[Path]:
    """Remove the temp files (``.{name}.*.tmp``, as :func:`atomic_open` names them) that a killed save left in
    ``folder`` (not its sub-folders); returns what was removed.

    Only safe while no live writer uses ``folder``: call it from the one process that holds the run's lock."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for stale in sorted(folder.glob(pattern)):
        if not stale.is_file() or stale.is_symlink():
            continue
        with contextlib.suppress(FileNotFoundError):  # another rank of a shared cleanup got there first
            stale.unlink()
            removed.append(stale)
    return removed


def check_output_dir(path: str | os.PathLike, what: str = "out_dir") -> None:
    """Fail with one line, before any data or teacher is loaded, when nothing can be written at ``path``: it is
    a file, it lies under a file, or its deepest existing folder is not writable (a file is really created and
    removed there, so read-only mounts, full quotas of inodes and permissions are all caught). Creates nothing."""
    path = Path(path)
    existing = path
    try:
        if path.exists() and not path.is_dir():
            raise WriteError(f"{what} {path} is a file, not a folder; choose another {what}")
        while not existing.exists():
            if existing.is_symlink():  # a dangling link: mkdir would fail with a confusing EEXIST
                raise WriteError(f"{what} {path}: {existing} is a broken symbolic link")
            existing = existing.parent
        if not existing.is_dir():
            raise WriteError(f"{what} {path} is under {existing}, which is a file, not a folder; choose another {what}")
        fd, probe = tempfile.mkstemp(prefix=".hpckd-write-test.", suffix=TEMP_SUFFIX, dir=existing)
        os.close(fd)
        os.unlink(probe)
    except WriteError:
        raise
    except OSError as exc:  # no permission to look (stat) or to write; a read-only or full file system
        problem = _WRITE_PROBLEMS.get(exc.errno or 0, exc.strerror or type(exc).__name__)
        raise WriteError(f"{what} {path} is not writable (tried in {existing}): {problem}") from exc


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_save(path: str | os.PathLike, save: Callable[[IO], None]) -> None:
    """Call ``save(handle)`` (e.g. ``lambda f: torch.save(obj, f)``) against a temp file, then rename."""
    with atomic_open(path, "wb") as handle:
        save(handle)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
