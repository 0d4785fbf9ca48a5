"""Where sweep jobs run: one factory for submitit executors, one call to run an array and collect its results.

``make_executor("slurm", ...)`` gives ``submitit.AutoExecutor(cluster="slurm")`` (one ``sbatch --array`` per
:func:`run_array` call), ``"local"`` gives ``submitit.LocalExecutor`` (subprocesses on this machine) and ``"debug"``
gives ``submitit.DebugExecutor`` (runs in this process, for a debugger). The same sweep config therefore runs on a
laptop and on a cluster; SLURM-only settings are ignored by the other two.

:func:`run_array` turns a job that did not complete (cancelled from outside, failed, timed out, or whose function
raised) into :class:`JobFailed`, a :class:`~hpckd.errors.UserError` whose one line names the job id, its state and
where its log is, instead of submitit's multi-line traceback.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
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
        executor = submitit.LocalExecutor(folder)
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
        ) from None
    prefixed = {f"slurm_{key}": value for key, value in slurm_params.items() if value is not None}
    try:
        executor.update_parameters(**generic, **prefixed)
    except (NameError, AssertionError, ValueError) as exc:  # submitit's ways of rejecting a parameter
        first_line = str(exc).strip().splitlines()[0]
        raise ConfigError(f"bad SLURM executor parameter: {first_line}") from None
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
    does for them, open a post-mortem debugger when the function raises).
    """
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
