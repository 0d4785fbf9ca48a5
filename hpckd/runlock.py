"""One live run per ``out_dir``: an ``fcntl.flock`` on ``out_dir/.hpckd.lock`` held for the run's lifetime.

Two runs writing one folder would overwrite each other's checkpoints, ``last.pt`` and ``results.json`` while each
reports its own accuracy. The run that holds the lock writes who it is (host, pid, SLURM job, start time) into the
lock file; a second run fails at once with one line naming that holder.

The kernel releases a ``flock`` when the last descriptor of its open file goes away, so a run killed with
``kill -9`` (or a node that rebooted, for a local disk) leaves a lock file that blocks nobody: a resume just takes
it. The file itself is never removed (removing it would let a run lock a new file while another still holds the
old one). On a file system without ``flock`` support the run goes on with a warning, unguarded.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from types import TracebackType

from hpckd.errors import UserError
from hpckd.io import check_output_dir

LOCK_NAME = ".hpckd.lock"

# flock is not supported there (some NFS and Lustre mounts): no lock, but no reason to refuse the run either.
_NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLocked(UserError):
    """``out_dir`` is held by another live run."""


def slurm_job() -> str | None:
    """The SLURM job of this process as ``squeue`` shows it: ``ARRAYJOB_TASK`` for an array task, else the id."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def holder_record() -> dict[str, object]:
    """Who this process is, as written into the lock file."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": slurm_job(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def describe_holder(text: str) -> str:
    """``host H, pid P, SLURM job J, started T`` from a lock file's content (what is known of it)."""
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        # The holder took the lock a moment ago and has not written its record yet.
        return "holder details not written yet"
    parts = [f"host {record.get('host', '?')}", f"pid {record.get('pid', '?')}"]
    if record.get("slurm_job"):
        parts.append(f"SLURM job {record['slurm_job']}")
    if record.get("started"):
        parts.append(f"started {record['started']}")
    return ", ".join(parts)


def _locked_error(out_dir: Path, fd: int) -> RunLocked:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace")
    return RunLocked(f"out_dir {out_dir} is in use by a running hpckd job ({describe_holder(text)}"
                     f"{_exited_note(text)}); wait for it or use another out_dir")


def _exited_note(text: str) -> str:
    """A note when the recorded holder is a process of this host that has exited: the children it forked (data
    loader workers) keep the lock until they notice, a few seconds later."""
    try:
        record = json.loads(text)
        if record.get("host") != socket.gethostname():
            return ""
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return "; that process has exited, its worker processes are ending"
    except (ValueError, TypeError, KeyError, AttributeError, OSError):
        pass
    return ""


def _try_lock(fd: int, out_dir: Path, warn: bool) -> bool:
    """Take the exclusive lock without waiting: True if taken, False where the file system cannot lock;
    raises :class:`RunLocked` when another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError as exc:
        raise _locked_error(out_dir, fd) from exc
    except OSError as exc:
        if exc.errno in _NO_LOCKING:
            if warn:
                print(f"hpckd: warning: cannot lock {out_dir / LOCK_NAME} ({exc.strerror}); a second run into this "
                      f"out_dir would not be detected", file=sys.stderr, flush=True)
            return False
        raise


class RunLock:
    """``with RunLock(out_dir):`` -- create ``out_dir``, lock it for this process, record the holder.

    Raises :class:`RunLocked` (one line naming the holder) when a live run holds it. Held until the block exits
    or the process dies. Forked children (DataLoader workers) share the lock and never release it themselves."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None
        self._owner_pid: int | None = None

    def __enter__(self) -> "RunLock":
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)  # the umask applies
        except OSError:
            check_output_dir(self.out_dir)  # the one-line reason: a file in the way, read-only, no permission
            raise
        try:
            locked = _try_lock(fd, self.out_dir, warn=True)
            if locked:
                payload = (json.dumps(holder_record()) + "\n").encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, payload, 0)
                os.fsync(fd)
        except BaseException:
            os.close(fd)  # closing our only descriptor also drops a lock we took
            raise
        self._fd, self._owner_pid = fd, os.getpid()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def release(self) -> None:
        """Give the lock up (idempotent). The record is cleared first, so nobody reads a finished run as holder."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if os.getpid() == self._owner_pid:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass  # closing below drops the lock anyway
        finally:
            os.close(fd)


def check_lock_free(out_dir: str | os.PathLike) -> None:
    """Raise :class:`RunLocked` if a live run holds ``out_dir`` (take the lock and give it back at once).

    For launchers that start the run in other processes (the torchrun wrapper): they fail before starting
    anything. Creates nothing; a folder without a lock file is free."""
    out_dir = Path(out_dir)
    path = out_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no lock file (or unreadable): nothing to probe; the run itself takes the lock
    try:
        if _try_lock(fd, out_dir, warn=False):
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
