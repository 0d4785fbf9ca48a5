"""Signals reach the work they are meant to stop, and nothing outlives the command that started it.

* SIGTERM to `hpckd train ... dist.nproc_per_node=2` (the wrapper that re-runs the command under torchrun) is
  forwarded to the ranks: they checkpoint at the next step and stop; the wrapper exits 128 + 15 with the one-line
  preemption message, and no rank is left to write results later.
* SIGINT (a Ctrl-C at the terminal: the whole foreground process group) or SIGTERM to the `hpckd demo` driver
  cancels its running stage jobs -- they checkpoint and stop -- and prints one line, no submitit tracebacks.

Every process is real; the tests wait on what the processes write (log records), never on a clock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.helpers import REPO, log_events, processes_mentioning, tiny_run_args, wait_for


def launch(args: list[str], **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "hpckd", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_signal_to_the_torchrun_wrapper_checkpoints_the_ranks_and_leaves_no_process(tmp_path, tiny_root, sig):
    """SIGTERM is forwarded as is; a Ctrl-C (SIGINT to the terminal's process group, which holds only the wrapper:
    the ranks run in sessions of their own) reaches the ranks as SIGTERM, so they too stop at a checkpoint."""
    out = tmp_path / "run"
    wrapper = launch(["train", *tiny_run_args(tiny_root, out, "dist.nproc_per_node=2", "optim.epochs=500",
                                              "log_every=1", "data.eval_batch_size=2")], start_new_session=True)
    try:
        wait_for(lambda: log_events(out / "log.jsonl", "step"), 300, "the first logged training step", wrapper)
        running = processes_mentioning(f"out_dir={out}")  # the wrapper, torchrun, both ranks, their loader workers
        assert wrapper.pid in running and len(running) >= 4, running
        os.killpg(wrapper.pid, sig)  # SIGTERM: what SLURM sends a preempted or cancelled job
        stdout, stderr = wrapper.communicate(timeout=300)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    assert wrapper.returncode == 128 + sig, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hpckd: preempted by SIGTERM: checkpoint written at epoch "), stderr
    assert lines[0].endswith("rerun the same command to resume")
    # Every process of the run is gone with the wrapper -- none can write results later.
    assert processes_mentioning(f"out_dir={out}") == []
    for pid in running:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (out / "results.json").exists() and not (out / "last.pt").exists()
    preempted = log_events(out / "log.jsonl", "preempted")
    assert len(preempted) == 1 and preempted[0]["signal"] == "SIGTERM"
    checkpoints = sorted((out / "checkpoints").glob("step-*.pt"))
    assert checkpoints and checkpoints[-1].name == f"step-{preempted[0]['step']:08d}.pt"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stopping_the_demo_driver_cancels_its_stage_jobs(tmp_path, sig):
    root = tmp_path / "demo"
    # The driver leads its own process group, as a shell runs a command: a Ctrl-C signals the whole group.
    driver = launch(["demo", "--out", str(root), "--epochs-scale", "3"], start_new_session=True)
    teachers = ["T1w", "T2w"]  # configs/sweeps/demo.yaml's teachers, trained at the same time
    try:
        for name in teachers:  # both stage jobs are training (inside their preemption guard)
            wait_for(lambda: log_events(root / "teachers" / name / "log.jsonl", "step"), 600, f"a step of {name}",
                     driver)
        jobs = processes_mentioning(str(root / "submitit"))  # controllers and tasks of the stage jobs
        assert jobs, "no stage job process found"
        if sig == signal.SIGINT:
            os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground process group
        else:
            driver.send_signal(signal.SIGTERM)
        stdout, stderr = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 128 + sig, stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert lines[0].startswith(f"hpckd: stopped by {signal.Signals(sig).name}: cancelled job(s) ")
    assert lines[0].endswith(f"rerun `hpckd demo --out {root}` to resume")
    assert processes_mentioning(str(root / "submitit")) == []  # no stage job runs on
    for pid in jobs:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    for name in teachers:  # each job stopped at a step boundary with a checkpoint, and did not finish
        run = root / "teachers" / name
        assert not (run / "results.json").exists()
        preempted = log_events(run / "log.jsonl", "preempted")
        assert [p["signal"] for p in preempted] == ["SIGTERM"]
        assert (run / "checkpoints" / f"step-{preempted[0]['step']:08d}.pt").is_file()


def test_a_corrupt_stage_result_is_reported_and_its_job_runs_again(tmp_path):
    """A finished job whose results.json a full disk truncated is not counted as done: `hpckd sweep status` says
    so (naming the file), and the next run re-runs that job only (the others stay done)."""
    from hpckd.sweep.demo import demo_plan
    from hpckd.sweep.jobs import write_state
    from hpckd.sweep.runner import prepare

    root = tmp_path / "demo"
    plan = demo_plan(root)
    prepare(plan)
    for job in plan.jobs.values():  # every job finished, as far as its state files say
        write_state(job.folder, job.stage, "done", {"config_hash": job.config_hash})
        (job.folder / "results.json").write_text(json.dumps({"name": job.name, "metrics": {"accuracy": 0.5}}))
    broken = root / "teachers" / "T2s" / "results.json"
    broken.write_text('{"name": "T2s", "metr')  # as a full disk left it before writes were atomic
    proc = subprocess.run([sys.executable, "-m", "hpckd", "sweep", "status", str(root)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    states = {tuple(line.split()[:2]): line.split()[2] for line in proc.stdout.splitlines()[2:-1]}
    expected = {(job.stage, job.name): "done" for job in plan.jobs.values()}
    expected[("teachers", "T2s")] = "failed"
    expected[("report", "report")] = "new"  # its report.html was never written: it runs again
    assert states == expected, proc.stdout
    (t2s_line,) = [line for line in proc.stdout.splitlines() if " T2s " in line]
    assert f"{broken} is missing or not valid JSON; rerun to redo it" in t2s_line
    assert proc.stdout.splitlines()[-1] == "1 new, 24 done, 1 failed"
