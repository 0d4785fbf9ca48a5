"""Sweep dispatch on a real SLURM cluster with accounting (slurmctld, slurmd, slurmdbd, MariaDB, munged).

These tests need the live cluster that ``slurm/with_cluster.sh`` starts (it exports HPCKD_SLURM_STATE and
SLURM_CONF); run them as::

    bash slurm/with_cluster.sh .venv/bin/python -m pytest -q tests/test_slurm.py

Without that they fail (never skip), saying so. Each test uses its own submitit folder, because an old folder
would hand back stale results for recycled job ids.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from hpckd.errors import ConfigError, UserError
from hpckd.sweep.executor import JobFailed, collect_results, make_executor, run_array
from tests.helpers import require_cluster

# The job processes unpickle the task functions below; ship them by value so they need not import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Bounds for waiting on the cluster (generous for a loaded 2-core CI machine; normal runs take seconds).
pytestmark = pytest.mark.slurm

STARTUP_BOUND_S = 90.0
CANCEL_REPORT_BOUND_S = 20.0
POLL_S = 0.2


# ------------------------------------------------------------------------------------------- job functions


def square_and_task_id(x: int) -> tuple[int, int]:
    """Runs inside an array task: the input squared, and the array index SLURM gave this task."""
    return x * x, int(os.environ["SLURM_ARRAY_TASK_ID"])


def block_until(started: str, never: str, bound_s: float) -> str:
    """Announce that the job runs, then wait for a file nobody creates (the test cancels the job meanwhile)."""
    Path(started).write_text(os.environ.get("SLURM_JOB_ID", "?"))
    deadline = time.monotonic() + bound_s
    while not Path(never).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return "not cancelled"


def rank_info(_: object) -> tuple[int, int, int]:
    env = submitit.JobEnvironment()
    return env.global_rank, env.local_rank, env.num_tasks


def raise_value_error(trial: int) -> None:
    raise ValueError(f"bad trial {trial}")


# ------------------------------------------------------------------------------------------- helpers


def wait_for_file(path: Path, bound_s: float) -> None:
    """Bounded poll until ``path`` exists (the job has started running)."""
    deadline = time.monotonic() + bound_s
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"the job did not start within {bound_s} s ({path} never appeared)")
        time.sleep(POLL_S)


def sacct_state(job_id: str, bound_s: float = 10.0) -> str:
    """The job's state as recorded by accounting (slurmdbd), polled until it is recorded."""
    deadline = time.monotonic() + bound_s
    while True:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], check=True, capture_output=True, text=True
        ).stdout.split()
        if out and out[0] not in {"PENDING", "RUNNING", "COMPLETING"}:
            return out[0]
        if time.monotonic() > deadline:
            pytest.fail(f"sacct did not record an end state for job {job_id} within {bound_s} s (got {out})")
        time.sleep(POLL_S)


# ------------------------------------------------------------------------------------------- tests


def test_map_array_of_four_returns_every_result(tmp_path: Path) -> None:
    require_cluster("tests/test_slurm.py")
    executor = make_executor("slurm", tmp_path / "submitit", array_parallelism=4, timeout_min=5)
    jobs = executor.map_array(square_and_task_id, [0, 1, 2, 3])
    results = collect_results(jobs, poll_s=POLL_S)
    # (x*x, array index) by hand: inputs 0..3 map to array tasks 0..3 in order.
    assert results == [(0, 0), (1, 1), (4, 2), (9, 3)]
    sbatch = jobs[0].paths.submission_file.read_text()
    assert re.search(r"^#SBATCH --array=0-3%4$", sbatch, re.MULTILINE), sbatch
    assert all(sacct_state(job.job_id) == "COMPLETED" for job in jobs)


def test_run_array_passes_tuples_as_positional_arguments(tmp_path: Path) -> None:
    require_cluster("tests/test_slurm.py")
    executor = make_executor("slurm", tmp_path / "submitit", timeout_min=5)
    results = run_array(executor, divmod, [(7, 2), (9, 4)])
    assert results == [(3, 1), (2, 1)]


def test_job_cancelled_from_outside_is_reported_cancelled(tmp_path: Path) -> None:
    require_cluster("tests/test_slurm.py")
    started, never = tmp_path / "started", tmp_path / "never"
    executor = make_executor("slurm", tmp_path / "submitit", timeout_min=5)
    jobs = executor.map_array(block_until, [str(started)], [str(never)], [300.0])
    wait_for_file(started, STARTUP_BOUND_S)
    job_id = jobs[0].job_id
    assert started.read_text() == job_id.split("_")[0]

    subprocess.run(["scancel", job_id], check=True)
    t0 = time.monotonic()
    with pytest.raises(JobFailed) as info:
        collect_results(jobs, poll_s=POLL_S)
    elapsed = time.monotonic() - t0

    assert elapsed < CANCEL_REPORT_BOUND_S, f"cancellation took {elapsed:.1f} s to be reported"
    assert isinstance(info.value, UserError)
    assert info.value.state == "CANCELLED"
    assert info.value.job_id == job_id
    assert f"job {job_id} ended CANCELLED" in str(info.value)
    assert "\n" not in str(info.value)
    assert sacct_state(job_id) == "CANCELLED"
    assert not never.exists()


def test_two_task_job_gives_ranks_zero_and_one(tmp_path: Path) -> None:
    require_cluster("tests/test_slurm.py")
    executor = make_executor("slurm", tmp_path / "submitit", tasks_per_node=2, cpus_per_task=1, timeout_min=5)
    (per_task,) = run_array(executor, rank_info, [None], poll_s=POLL_S)
    assert {rank for rank, _, _ in per_task} == {0, 1}
    assert {local for _, local, _ in per_task} == {0, 1}
    assert [n for _, _, n in per_task] == [2, 2]
    assert "#SBATCH --ntasks-per-node=2" in Path(next((tmp_path / "submitit").glob("*_submission.sh"))).read_text()


def test_function_error_is_one_line_job_failed(tmp_path: Path) -> None:
    require_cluster("tests/test_slurm.py")
    executor = make_executor("slurm", tmp_path / "submitit", timeout_min=5)
    with pytest.raises(JobFailed) as info:
        run_array(executor, raise_value_error, [1, 2], poll_s=POLL_S)
    assert info.value.state == "FAILED"
    assert [state for _, state, _ in info.value.failures] == ["FAILED", "FAILED"]
    message = str(info.value)
    assert "ValueError: bad trial 1" in message and "(and 1 more failed job(s))" in message
    assert "\n" not in message


def test_bad_executor_settings_are_config_errors(tmp_path: Path) -> None:
    require_cluster("tests/test_slurm.py")
    with pytest.raises(ConfigError, match="unknown executor 'pbs'"):
        make_executor("pbs", tmp_path)
    with pytest.raises(ConfigError, match="bad SLURM executor parameter"):
        make_executor("slurm", tmp_path, no_such_sbatch_option=1)


@pytest.mark.dist  # dist-check's all-reduce across the two srun tasks
def test_sbatch_template_runs_two_srun_ranks(tmp_path: Path) -> None:
    require_cluster("tests/test_slurm.py")
    template = Path(__file__).resolve().parents[1] / "slurm" / "hpckd.sbatch"
    entry = Path(sys.executable).parent / "hpckd"
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={tmp_path}", str(template), "dist-check"],
        env={**os.environ, "HPCKD": str(entry)},
        check=True,
        capture_output=True,
        text=True,
    )
    job_id = submitted.stdout.strip().split(";")[0]
    assert sacct_state(job_id, bound_s=STARTUP_BOUND_S) == "COMPLETED"
    lines = sorted(line for line in (tmp_path / f"hpckd-{job_id}.out").read_text().splitlines() if "all_reduce" in line)
    # Two srun tasks; each contributes rank + 1, so the all-reduced sum is 1 + 2 = 3 on both.
    assert [line.split()[1] for line in lines] == ["0/2", "1/2"]
    assert all("launcher=srun" in line and "all_reduce=3" in line for line in lines)
