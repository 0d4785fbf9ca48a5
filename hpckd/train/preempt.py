"""Preemption: a signal asks for a checkpoint at the next optimizer-step boundary, then the job stops (and requeues).

SLURM warns a job before it ends it: ``--signal=USR2@90`` (or submitit's default) sends SIGUSR2 ahead of the time
limit, and preemption or ``scancel`` sends SIGTERM (SIGKILL follows after ``KillWait``). A signal handler only
records the request; the loop finishes the step it is in, every rank agrees on the flag (one small CPU all-reduce at
the loop's check points, shared with the deferred non-finite-loss check; a single process needs none and stops at
the next optimizer step), the checkpoint is written collectively, and
:func:`hand_over` decides what happens to the job:

* a handler that was installed before ours (submitit's, inside a submitit job) is called now, at the step boundary
  instead of mid-step: on rank 0 it calls the job's ``checkpoint()`` (:class:`hpckd.train.job.TrainJob` is
  ``submitit.helpers.Checkpointable``), requeues the job and exits;
* otherwise, for SIGUSR2 inside a SLURM batch job, rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` (``train.requeue``);
* SIGTERM is never answered with a requeue of our own: SLURM requeues preempted jobs itself (``PreemptMode=REQUEUE``),
  and a job someone cancelled with ``scancel`` must stay cancelled.

The requeued job runs the same command (or the same pickled submitit call); ``resume=auto`` picks up the newest
valid checkpoint, so it continues exactly where it stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from types import FrameType
from typing import Any, Sequence

from hpckd.dist import barrier


class Preempted(SystemExit):
    """Training stopped at a step boundary after a preemption signal; the checkpoint is written.

    A :class:`SystemExit` on purpose: submitit must not record a result (the job is not finished), and the
    ``hpckd`` command must exit with the conventional 128 + signal number.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message

    def __str__(self) -> str:
        return self.message


def signal_number(name: str) -> int:
    """``"USR2"`` / ``"SIGUSR2"`` -> ``signal.SIGUSR2``."""
    return int(getattr(signal, f"SIG{name.upper().removeprefix('SIG')}"))


class PreemptionGuard:
    """Context manager: while training, the given signals only set :attr:`requested`; the previous handlers come
    back on exit. Outside the main thread (no handlers can be installed there) it never triggers."""

    def __init__(self, names: Sequence[str]) -> None:
        self.signals = [signal_number(n) for n in names]
        self.previous: dict[int, Any] = {}
        self.requested: int | None = None

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:  # the first signal decides (SIGTERM after SIGUSR2 is SLURM ending the job)
            self.requested = signum

    def previous_handler(self, signum: int) -> Any:
        return self.previous.get(signum)


def hand_over(guard: PreemptionGuard, signum: int, rank: int, requeue: bool, where: str) -> Preempted:
    """After the preemption checkpoint: chain to the previous handler or requeue, and return the exit to raise.

    Our handlers stay until the exit leaves the guard's ``with`` block: the SIGTERM that SLURM sends a job it
    requeues must not kill a rank before every rank is through here."""
    name = signal.Signals(signum).name
    previous = guard.previous_handler(signum)
    if callable(previous) and requeue:
        # submitit's handler: on rank 0 it checkpoints the pickled call, requeues the job and exits (SystemExit).
        message = f"preempted by {name}: checkpoint written at {where}; submitit requeues the job"
        _announce(rank, message)
        previous(signum, None)
        return Preempted(signum, message)
    outcome = "rerun the same command to resume"
    if signum == signal.SIGUSR2 and requeue and rank == 0 and os.environ.get("SLURM_JOB_ID"):
        outcome = _scontrol_requeue(os.environ["SLURM_JOB_ID"])
    message = f"preempted by {name}: checkpoint written at {where}; {outcome}"
    _announce(rank, message)
    # Nobody exits before rank 0 has requeued: with `srun --kill-on-bad-exit` the first rank to exit ends the step.
    barrier()
    return Preempted(signum, message)


def _announce(rank: int, message: str) -> None:
    if rank == 0:
        print(f"hpckd: {message}", file=sys.stderr, flush=True)


def _scontrol_requeue(job_id: str) -> str:
    # The array task's own id when this is an array job (SLURM_JOB_ID is then the task's unique id already).
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        return f"`scontrol requeue {job_id}` failed ({detail.strip()}); resubmit the job to resume"
    return f"SLURM job {job_id} requeued; it resumes on its own"
