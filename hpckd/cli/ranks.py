"""The torchrun wrapper of ``hpckd``: a run with ``dist.nproc_per_node > 1`` started outside any launcher re-runs
itself under torchrun (:func:`relaunch_if_needed`). The ranks run in their own session, signals to the wrapper are
forwarded to them (they checkpoint and stop), and however many ranks fail, the user sees one error line (rank 0's,
or the first failing rank's) instead of one per rank and torchrun's report: each rank writes how it failed into the
folder named by ``HPCKD_ERROR_DIR`` (:func:`write_rank_record`) and the wrapper prints one of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Sequence


# Set by the torchrun wrapper for its ranks: each rank writes how it failed into this folder instead of printing.
ERROR_DIR_ENV = "HPCKD_ERROR_DIR"


# What the wrapper forwards to the ranks (SLURM's warning signal, scancel/preemption, Ctrl-C).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


def relaunch_if_needed(cfg, argv: Sequence[str]) -> int | None:
    """``dist.nproc_per_node > 1`` outside any launcher: run this same command under torchrun; its exit code.

    What can be checked here is checked first, so those errors stay one line: ``out_dir`` writable and not held
    by a live run, the data readable. The ranks then run in their own session: a Ctrl-C at the terminal reaches
    only this wrapper, which forwards it (and SIGTERM, SIGUSR2) to the ranks, waits until they have checkpointed
    and stopped, and exits with 128 + the signal number. Each rank writes how it failed into a folder passed in
    ``HPCKD_ERROR_DIR``; this wrapper prints one of them (:func:`report_rank_failures`)."""
    from hpckd.dist import detect_launcher

    n = cfg.dist.nproc_per_node
    if n <= 1 or detect_launcher() != "single":
        return None
    from hpckd.data.datasets import check_dataset
    from hpckd.io import check_output_dir
    from hpckd.runlock import check_lock_free

    check_output_dir(cfg.out_dir)
    check_lock_free(cfg.out_dir)
    check_dataset(cfg.data)  # also writes the file-index cache the ranks then reuse
    with tempfile.TemporaryDirectory(prefix="hpckd-ranks-") as errors:
        cmd = [sys.executable, "-c", _LAUNCHER, "--standalone", f"--nproc_per_node={n}", "-m", "hpckd", *argv]
        proc = subprocess.Popen(cmd, env={**os.environ, ERROR_DIR_ENV: errors}, start_new_session=True)
        with forwarding_signals(proc, errors) as received:
            rc = proc.wait()
        kill_leftovers(proc.pid, errors)
        return report_rank_failures(Path(errors), rc, received)


# torchrun in a process of its own, minus its failure report (a traceback and a box per failed rank): the ranks
# say what went wrong themselves. Launcher problems (rendezvous, bad arguments) still raise with a traceback.
_LAUNCHER = "import sys; from hpckd.cli.ranks import launch_ranks; sys.exit(launch_ranks(sys.argv[1:]))"


def launch_ranks(torchrun_args: list[str]) -> int:
    """Body of the torchrun process that :func:`relaunch_if_needed` starts; returns its exit code."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.disable(logging.ERROR)  # torchrun's per-rank failure lines and its OMP_NUM_THREADS notice
    try:
        run(parse_args(torchrun_args))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with {failure.exitcode}")
        write_rank_record({"kind": "launcher", "rank": rank, "exit_code": 1,
                            "text": f"hpckd: error: rank {rank} (pid {failure.pid}) {how} without reporting an error"},
                           name="launcher")
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as exc:  # torchrun itself was signalled (it stopped the ranks first)
        return 128 + int(exc.sigval)
    return 0


@contextlib.contextmanager
def forwarding_signals(proc: subprocess.Popen, errors: str):
    """While the ranks run: SIGTERM and SIGUSR2 go to the ranks (torchrun's children), which checkpoint at the
    next step and stop; torchrun then stops the rest. A Ctrl-C (SIGINT) reaches them as SIGTERM, so that it too
    stops them at a checkpoint (the ranks' preemption guard listens to SIGTERM and SIGUSR2); a second Ctrl-C kills
    every process of the run at once. Yields the list of signals received."""
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and signal.SIGINT in received:
            kill_leftovers(proc.pid, errors)
            return
        received.append(signum)
        ranks = _children(proc.pid)
        # Not torchrun itself: it would die of SIGUSR2 (no handler) and leave the ranks running.
        targets = ranks if ranks else [proc.pid]
        to_ranks = signal.SIGTERM if signum == signal.SIGINT else signum
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, to_ranks if ranks else signal.SIGTERM)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _proc_entries() -> list[Path]:
    """``/proc/<pid>`` of every process (none where there is no ``/proc``: then only torchrun is signalled)."""
    try:
        return [entry for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    """Pids of the live child processes of ``pid`` (Linux ``/proc``)."""
    found = []
    for entry in _proc_entries():
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # Fields after the command (in parentheses, may hold spaces): state, ppid, ...
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _kill_session(sid: int) -> None:
    """SIGKILL every process left in the session (process group) ``sid`` that the wrapper started."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, signal.SIGKILL)


def kill_leftovers(launcher: int, errors: str) -> None:
    """Nothing of the run may outlive it: torchrun starts each rank in a session of its own, so a rank (or its
    loader worker) that torchrun left behind is found by the ``HPCKD_ERROR_DIR`` value it inherited."""
    _kill_session(launcher)
    marker = f"{ERROR_DIR_ENV}={errors}".encode()
    for entry in _proc_entries():
        if int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue  # exited meanwhile, or not ours
        if marker in environ.split(b"\0"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)


def write_rank_record(record: dict, name: str | None = None) -> None:
    """Tell the wrapper (through ``HPCKD_ERROR_DIR``) how this rank failed; a no-op outside the wrapper."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder:
        return
    from hpckd.io import atomic_write_json

    rank = os.environ.get("RANK", "0")
    record = {"rank": int(rank), "time_ns": time.monotonic_ns(), **record}
    with contextlib.suppress(OSError):  # the wrapper is gone; nobody is left to tell
        atomic_write_json(Path(folder) / f"{name or 'rank-' + rank}.json", record)


def _read_rank_records(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text()))
    return records


def report_rank_failures(folder: Path, rc: int, received: list[int]) -> int:
    """Print the one report of a failed run of ranks and return the wrapper's exit code.

    The first user error in time wins (rank 0's when it is the same error, as when every rank checks the same
    thing) over the errors other ranks then met because of it (a collective whose peer left); then a bug's
    traceback; then what torchrun saw. After a forwarded signal the exit code is 128 + its number; rank 0 has
    printed its preemption line already."""
    records = _read_rank_records(folder)

    def first(kind: str) -> dict | None:
        chosen = sorted((r for r in records if r.get("kind") == kind), key=lambda r: r["time_ns"])
        if not chosen:
            return None
        same = [r for r in chosen if r["rank"] == 0 and r.get("message") == chosen[0].get("message")]
        return same[0] if same else chosen[0]

    if received and rc != 0:
        signum = received[0]
        user = first("user")
        if user is not None:
            print_text(user["text"])
        elif first("stop") is None:
            print(f"hpckd: stopped by {signal.Signals(signum).name} before the ranks reached a checkpoint; "
                  f"rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 128 + signum
    for kind in ("user", "interrupt", "bug", "launcher"):
        record = first(kind)
        if record is not None:
            print_text(record["text"])
            return int(record.get("exit_code", 1))
    return rc


def print_text(text: str) -> None:
    print(text, file=sys.stderr, end="" if text.endswith("\n") else "\n", flush=True)


def under_wrapper() -> bool:
    """A rank started by :func:`relaunch_if_needed` (which collects the ranks' failures)."""
    return bool(os.environ.get(ERROR_DIR_ENV)) and os.environ.get("RANK") is not None
