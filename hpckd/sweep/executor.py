"""Where sweep jobs run: one factory for submitit executors, one call to run an array and collect its results.

``make_executor("slurm", ...)`` gives ``submitit.AutoExecutor(cluster="slurm")`` (one ``sbatch --array`` per
:func:`run_array` call), ``"local"`` gives ``submitit.LocalExecutor`` (subprocesses on this machine) and ``"debug"``
gives ``submitit.DebugExecutor`` (runs in this process, for a debugger). The same sweep config therefore runs on a
laptop and on a cluster; SLURM-only settings are ignored by the other two.

:func:`run_array` turns a job that did not complete (cancelled from outside, failed, timed out, or whose function
raised) into :class:`JobFailed`, a :class:`~hpckd.errors.UserError` whose one line names the job id, its state and
where its log is, instead of submitit's multi-line traceback.

The driver owns its jobs: SIGINT (Ctrl-C) or SIGTERM while it waits cancels every running job of the array
(:func:`cancel_on_signals`) -- a local job gets SIGTERM, checkpoints at its next step and stops; one that has not
stopped after :data:`CANCEL_GRACE_S` seconds, or a second signal, kills it -- and raises :class:`SweepStopped`.
Local jobs run in sessions of their own (:class:`SessionLocalExecutor`), so a Ctrl-C at the terminal reaches only
the driver instead of printing a KeyboardInterrupt traceback from every job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import submitit
from submitit.core import utils as submitit_utils

from hpckd.errors import ConfigError, UserError

EXECUTOR_KINDS = ("slurm", "local", "debug")

# A job in one of these states is finished (sacct's base states; submitit's LocalJob says FINISHED).
COMPLETED_STATES = frozenset({"COMPLETED", "FINISHED", "DONE"})


class JobFailed(UserError):
    """A sweep job ended without a result: cancelled, failed, timed out, or its function raised.

    ``failures`` lists every failed job of the array as ``(job_id, state, detail)``; the message names the first.
    """

    def __init__(self, failures: Sequence[tuple[str, str, str]]) -> None:
        self.failures = list(failures)
        job_id, state, detail = self.failures[0]
        more = f" (and {len(self.failures) - 1} more failed job(s))" if len(self.failures) > 1 else ""
        super().__init__(f"job {job_id} ended {state}: {detail}{more}")

    @property
    def job_id(self) -> str:
        return self.failures[0][0]

    @property
    def state(self) -> str:
        return self.failures[0][1]


class SweepStopped(Exception):
    """The driver was asked to stop (SIGINT/SIGTERM) and has cancelled its running jobs; exit 128 + signum."""

    def __init__(self, signum: int, cancelled: Sequence[str]) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        self.cancelled = list(cancelled)
        jobs = f"cancelled job(s) {', '.join(self.cancelled)}" if self.cancelled else "no job was running"
        super().__init__(f"stopped by {signal.Signals(signum).name}: {jobs}")


class _Signalled(BaseException):
    """Raised by the signal handler out of whatever the driver was waiting on (not an Exception: nothing on the
    way may swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CANCEL_GRACE_S = 120.0  # a cancelled local job's time to reach its next step and checkpoint


@contextlib.contextmanager
def cancel_on_signals(jobs: Sequence[submitit.Job], grace_s: float | None = None) -> Iterator[None]:
    """While inside, SIGINT or SIGTERM cancels ``jobs`` (a list that may grow inside the block: what was submitted
    so far) and raises :class:`SweepStopped`. Outside the main thread (no handlers there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Signalled(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    except _Signalled as signalled:
        cancelled = cancel_jobs(jobs, CANCEL_GRACE_S if grace_s is None else grace_s)
        raise SweepStopped(signalled.signum, cancelled) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def cancel_jobs(jobs: Sequence[submitit.Job], grace_s: float = CANCEL_GRACE_S) -> list[str]:
    """Stop every running job of ``jobs`` and wait until it has; returns their ids.

    A local job's controller gets SIGTERM, which it forwards to its tasks (a training task checkpoints at its next
    step and exits); after ``grace_s`` seconds, or at a further SIGINT/SIGTERM, its whole session is killed. Other
    jobs (SLURM) are cancelled through submitit (``scancel``: SLURM signals and ends them)."""
    local = [job for job in jobs if _controller(job) is not None and _controller(job).poll() is None]
    others = [job for job in jobs if _controller(job) is None and not isinstance(job, submitit.DebugJob)
              and not _finished(job)]

    def kill_now(signum: int, frame: FrameType | None) -> None:
        for job in local:
            _kill_session(_controller(job).pid)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, kill_now) for signum in STOP_SIGNALS} if main_thread else {}
    try:
        for job in local:
            with contextlib.suppress(ProcessLookupError):
                _controller(job).send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for job in local:
            process = _controller(job)
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_session(process.pid)
                process.wait()
            _kill_session(process.pid)  # a task or loader worker the controller left behind
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for job in others:
        with contextlib.suppress(Exception):  # already gone, or sacct/scancel unavailable: nothing else to do
            job.cancel(check=False)
    return [str(job.job_id) for job in local + others]


def _controller(job: submitit.Job) -> subprocess.Popen | None:
    """The controller process of a local job (None for other executors)."""
    process = getattr(job, "_process", None) if isinstance(job, submitit.local.local.LocalJob) else None
    return process if isinstance(process, subprocess.Popen) else None


def _finished(job: submitit.Job) -> bool:
    with contextlib.suppress(Exception):
        return job_state(job) in COMPLETED_STATES or job.done()
    return False


def _kill_session(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class SessionLocalExecutor(submitit.LocalExecutor):
    """submitit's local executor with each job's controller in a session of its own.

    With the stock executor a Ctrl-C at the terminal reaches every controller and task, each printing a
    KeyboardInterrupt traceback; here it reaches only the driver, which cancels the jobs itself
    (:func:`cancel_on_signals`). The controller is started exactly as ``submitit.local.local.start_controller``
    (submitit 1.5) starts it, plus ``start_new_session``."""

    def _submit_command(self, command: str) -> submitit.local.local.LocalJob:
        ntasks = self.parameters.get("tasks_per_node", 1)
        n_gpus = self.parameters.get("gpus_per_node", 0)
        visible_gpus = self.parameters.get("visible_gpus", ())
        gpus = range(n_gpus) if visible_gpus == () else visible_gpus[:n_gpus]
        env = {
            **os.environ,
            "SUBMITIT_LOCAL_NTASKS": str(ntasks),
            "SUBMITIT_LOCAL_COMMAND": command,
            "SUBMITIT_LOCAL_TIMEOUT_S": str(int(60 * self.parameters.get("timeout_min", 2.0))),
            "SUBMITIT_LOCAL_SIGNAL_DELAY_S": str(int(self.parameters.get("signal_delay_s", 30))),
            "SUBMITIT_LOCAL_NODEID": "0",
            "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
            "SUBMITIT_STDERR_TO_STDOUT": "1" if self.parameters.get("stderr_to_stdout", False) else "",
            "SUBMITIT_EXECUTOR": "local",
            "CUDA_VISIBLE_DEVICES": ",".join(str(k) for k in gpus),
            "SUBMITIT_LOCAL_WITH_SHELL": "",
        }
        process = subprocess.Popen([sys.executable, "-m", "submitit.local._local", str(self.folder)], env=env,
                                   start_new_session=True)
        return submitit.local.local.LocalJob(folder=self.folder, job_id=str(process.pid), process=process,
                                             tasks=list(range(ntasks)))


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """What one finished job gave: its result, or why it has none."""

    job_id: str
    result: Any = None
    state: str = "COMPLETED"
    detail: str = ""

    @property
    def ok(self) -> bool:
        return not self.detail


def make_executor(
    kind: str,
    folder: str | Path,
    *,
    array_parallelism: int | None = None,
    timeout_min: int = 60,
    cpus_per_task: int = 1,
    tasks_per_node: int = 1,
    nodes: int = 1,
    partition: str | None = None,
    name: str = "hpckd",
    **slurm_extra: Any,
) -> submitit.Executor:
    """Return a submitit executor of ``kind`` ("slurm", "local" or "debug") writing its files under ``folder``.

    ``array_parallelism`` caps how many array tasks SLURM runs at once (``--array=0-N%P``); ``partition`` and
    ``slurm_extra`` (any SlurmExecutor parameter without its ``slurm_`` prefix, e.g. ``account``, ``qos``,
    ``srun_args``, ``additional_parameters``) apply to SLURM only and are ignored by the other kinds, so one
    sweep config serves all three.
    """
    if kind not in EXECUTOR_KINDS:
        raise ConfigError(f"unknown executor {kind!r}; use one of {', '.join(EXECUTOR_KINDS)}")
    folder = Path(folder)
    if kind == "debug":
        return submitit.DebugExecutor(folder)
    if kind == "local":
        executor = SessionLocalExecutor(folder)
        # The local executor runs one node; cpus_per_task is advisory there (no binding), kept for the record.
        executor.update_parameters(timeout_min=timeout_min, tasks_per_node=tasks_per_node, nodes=1)
        return executor
    return _make_slurm_executor(
        folder,
        timeout_min=timeout_min,
        cpus_per_task=cpus_per_task,
        tasks_per_node=tasks_per_node,
        nodes=nodes,
        name=name,
        slurm_params={"partition": partition, "array_parallelism": array_parallelism, **slurm_extra},
    )


def _make_slurm_executor(folder: Path, *, slurm_params: dict[str, Any], **generic: Any) -> submitit.Executor:
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    except RuntimeError as exc:  # submitit raises this when `srun` is not on PATH
        raise UserError(
            f"executor 'slurm' needs the SLURM client tools (srun, sbatch, sacct) on PATH: {exc}; "
            "use executor 'local' on a machine without SLURM"
        ) from exc
    prefixed = {f"slurm_{key}": value for key, value in slurm_params.items() if value is not None}
    try:
        executor.update_parameters(**generic, **prefixed)
    except (NameError, AssertionError, ValueError) as exc:  # submitit's ways of rejecting a parameter
        first_line = str(exc).strip().splitlines()[0]
        raise ConfigError(f"bad SLURM executor parameter: {first_line}") from exc
    return executor


def run_array(
    executor: submitit.Executor,
    fn: Callable[..., Any],
    args_list: Sequence[Any],
    *,
    poll_s: float = 2.0,
) -> list[Any]:
    """Run ``fn`` once per item of ``args_list`` as one array job and return the results in order.

    Each item is a tuple of positional arguments for ``fn`` (any other value is passed as the single argument).
    Raises :class:`JobFailed` once every job has ended if any of them ended without a result.
    """
    if not args_list:
        return []
    calls = [item if isinstance(item, tuple) else (item,) for item in args_list]
    if len({len(c) for c in calls}) != 1:
        raise ConfigError("run_array: every item of args_list must give fn the same number of arguments")
    jobs = executor.map_array(fn, *zip(*calls))
    return collect_results(jobs, poll_s=poll_s)


def collect_results(jobs: Sequence[submitit.Job], *, poll_s: float = 2.0) -> list[Any]:
    """Wait for ``jobs`` (e.g. from ``map_array``) and return their results in order, or raise :class:`JobFailed`.

    A job with several tasks (``tasks_per_node * nodes > 1``) gives the list of its tasks' results, by rank.
    The cluster state is re-read every ``poll_s`` seconds (one ``sacct`` call covers all jobs), so a job cancelled
    from outside is reported within about ``poll_s`` seconds however long it has been running; submitit's own
    back-off would otherwise check only every few minutes. Debug jobs run here, on first access (and, as submitit
    does for them, open a post-mortem debugger when the function raises). SIGINT/SIGTERM while waiting cancels
    the jobs and raises :class:`SweepStopped`.
    """
    with cancel_on_signals(jobs):
        _wait_all([job for job in jobs if not isinstance(job, submitit.DebugJob)], poll_s)
    outcomes = [_outcome(job) for job in jobs]
    failures = [(o.job_id, o.state, o.detail) for o in outcomes if not o.ok]
    if failures:
        raise JobFailed(failures)
    return [o.result for o in outcomes]


def job_state(job: submitit.Job) -> str:
    """The job's base state as SLURM spells it ("CANCELLED by 0" -> "CANCELLED"); "UNKNOWN" if none yet."""
    state = str(job.state or "").strip().upper() or "UNKNOWN"
    # sacct appends who cancelled ("CANCELLED by 0"); other states are single words.
    return "CANCELLED" if state.startswith("CANCELLED") else state


def _wait_all(jobs: Sequence[submitit.Job], poll_s: float) -> None:
    pending = list(jobs)
    while pending:
        # One forced read refreshes submitit's shared watcher for every registered job; done() then reads its cache.
        pending[0].get_info(mode="force")
        pending = [job for job in pending if not job.done()]
        if pending:
            time.sleep(poll_s)


def _outcome(job: submitit.Job) -> _Outcome:
    if isinstance(job, submitit.DebugJob):
        return _debug_outcome(job)
    if job.num_tasks == 1:
        return _task_outcome(job, job.job_id)
    tasks = [_task_outcome(job.task(rank), f"{job.job_id} task {rank}") for rank in range(job.num_tasks)]
    failed = [t for t in tasks if not t.ok]
    return failed[0] if failed else _Outcome(job.job_id, result=[t.result for t in tasks])


def _task_outcome(task: submitit.Job, label: str) -> _Outcome:
    if task.paths.result_pickle.exists():
        return _pickled_outcome(task, label)
    state = job_state(task)
    if state not in COMPLETED_STATES:
        return _Outcome(label, state=state, detail=f"no result; log: {task.paths.stderr}")
    # Completed but the result file is not visible yet (slow shared filesystem): let submitit wait for it.
    try:
        return _Outcome(label, result=task.result())
    except submitit_utils.UncompletedJobError:
        return _Outcome(label, state=state, detail=f"no result file appeared; log: {task.paths.stderr}")


def _pickled_outcome(task: submitit.Job, label: str) -> _Outcome:
    outcome, payload = submitit_utils.pickle_load(task.paths.result_pickle)
    if outcome == "success":
        return _Outcome(label, result=payload)
    # payload is the formatted traceback of the job's function; its last line is the exception itself.
    last = [line for line in str(payload).strip().splitlines() if line.strip()]
    reason = last[-1].strip() if last else "unknown error"
    return _Outcome(label, state="FAILED", detail=f"{reason}; log: {task.paths.stderr}")


def _debug_outcome(job: submitit.Job) -> _Outcome:
    try:
        return _Outcome(job.job_id, result=job.result())
    except Exception as exc:  # the function ran in this process; report its error like a cluster job's
        return _Outcome(job.job_id, state="FAILED", detail=f"{type(exc).__name__}: {exc}")


class RequeueLimitReached(RuntimeError):
    """A job was preempted or timed out again after it had been requeued ``limit`` times already."""


class RequeueLimit(submitit.helpers.Checkpointable):
    """A checkpointable sweep job (a :class:`~hpckd.sweep.jobs.SweepTrainJob`, a logits job) with a requeue limit.

    submitit counts time-outs only (``max_num_timeout``): a job preempted with ``scancel --signal=USR2`` is requeued
    for ever. This wrapper counts every requeue itself -- the count travels in the pickle submitit requeues -- and
    once ``limit`` requeues were spent, the next preemption raises :class:`RequeueLimitReached` instead of
    requeueing: the job fails, and its error state (written by the job it wraps) says why. The checkpoint stays in
    the run's folder, so a later ``hpckd sweep run`` resumes from it."""

    def __init__(self, call: Callable[[], Any], limit: int, requeues: int = 0, setting: str = "max_requeues") -> None:
        self.call, self.limit, self.requeues, self.setting = call, int(limit), int(requeues), setting

    def __call__(self) -> Any:
        return self.call()

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # Called by submitit's signal handler on rank 0, after the training loop wrote its checkpoint.
        if self.requeues >= self.limit:
            raise RequeueLimitReached(f"requeued {self.requeues} times, limit {self.limit} ({self.setting}); "
                                      f"its checkpoint is kept: rerun the sweep to resume it")
        return submitit.helpers.DelayedSubmission(RequeueLimit(self.call, self.limit, self.requeues + 1, self.setting),
                                                  *args, **kwargs)


def with_requeue_limit(call: Callable[[], Any], limit: int, setting: str = "max_requeues") -> Callable[[], Any]:
    """``call`` wrapped in :class:`RequeueLimit` when it can be requeued (it is checkpointable), else unchanged;
    ``setting`` names the limit's config key in the error."""
    return RequeueLimit(call, limit, setting=setting) if hasattr(call, "checkpoint") else call
