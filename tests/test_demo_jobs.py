"""The demo's teacher and student jobs are submitit ``Checkpointable`` jobs (:class:`hpckd.sweep.demo.StageJob`).

A stage runs on submitit's real local executor and the callables it pickled are checked; a teacher job then trains for real on a tiny data set
(4 classes x 16 images, the demo's batch of 32 -> 2 steps per epoch, 2 epochs, resnet20), is "preempted" after its
first epoch (its final checkpoint and outputs deleted, as if the job had stopped there), and the job that its
``checkpoint()`` hands submitit -- pickled and loaded back, as a requeue does -- resumes and ends exactly where the
uninterrupted job ended.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import submitit
import torch

from hpckd.data.synth import SynthSpec, write_imagefolder
from hpckd.sweep import demo
from hpckd.checkpoint import CheckpointStore, load_checkpoint

CLASSES, PER_CLASS, VAL_PER_CLASS = 4, 16, 4
BATCH = 32  # the demo's data.batch_size
EPOCHS = 2
STEPS_PER_EPOCH = CLASSES * PER_CLASS // BATCH  # 2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo_jobs_data")
    write_imagefolder(root, SynthSpec(classes=CLASSES, per_class=PER_CLASS, val_per_class=VAL_PER_CLASS, seed=3))
    return root


def submitted_calls(root: Path) -> list:
    """What submitit's local executor really ran: the callables it pickled for each job, in job-id order."""
    files = sorted((root / "submitit").glob("*_submitted.pkl"), key=lambda f: int(f.name.split("_")[0]))
    return [submitit.helpers.DelayedSubmission.load(f).function for f in files]


@pytest.mark.slow  # submitit's local executor trains each job in its own process
def test_the_demo_submits_checkpointable_stage_jobs(data_root, tmp_path):
    jobs = demo.teacher_jobs(data_root, 1)
    demo.run_stage(jobs, tmp_path, "local")  # the real submitit local executor: one process per job
    calls = submitted_calls(tmp_path)
    assert len(calls) == len(jobs)
    for job, call in zip(jobs, calls):
        assert isinstance(call, submitit.helpers.Checkpointable)  # what makes submitit requeue it on preemption
        assert call.mode == job.mode
        # The demo's own overrides, then where the job writes and its name, as `hpckd demo` always had.
        assert call.overrides[: len(job.overrides)] == list(job.overrides)
        assert f"out_dir={tmp_path / 'runs' / job.name}" in call.overrides
        assert f"name={job.name}" in call.overrides
        # Each job runs on its share of the machine's CPUs.
        assert call.threads == max(1, (os.cpu_count() or 2) // len(jobs))
        assert json.loads((job.out_dir(tmp_path) / "results.json").read_text())["steps"] == STEPS_PER_EPOCH


@pytest.mark.slow  # the other job still trains in its own process
def test_a_finished_stage_is_not_submitted_again(data_root, tmp_path):
    jobs = demo.teacher_jobs(data_root, 1)
    (jobs[0].out_dir(tmp_path)).mkdir(parents=True)
    (jobs[0].out_dir(tmp_path) / "results.json").write_text("{}")
    demo.run_stage(jobs, tmp_path, "local")
    assert [c.overrides for c in submitted_calls(tmp_path)] == [demo.stage_overrides(jobs[1], tmp_path)]
    assert not (jobs[0].out_dir(tmp_path) / "checkpoints").exists()  # the finished job did not run again


def test_checkpoint_resubmits_an_equivalent_job(tmp_path):
    job = demo.teacher_jobs(tmp_path / "data", 3)[1]
    call = demo.StageJob(job, tmp_path, threads=3)
    delayed = call.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    delayed.dump(tmp_path / "requeued.pkl")  # what submitit's handler writes before it requeues the job
    requeued = submitit.helpers.DelayedSubmission.load(tmp_path / "requeued.pkl")
    assert isinstance(requeued.function, demo.StageJob)
    assert requeued.args == () and requeued.kwargs == {}
    expected = {"mode": "train", "config": None, "overrides": demo.stage_overrides(job, tmp_path), "threads": 3}
    assert vars(requeued.function) == vars(call) == expected


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "last.pt")["model"]


def test_a_teacher_job_trains_and_its_requeued_self_resumes_exactly(data_root, tmp_path):
    job = demo.teacher_jobs(data_root, EPOCHS)[0]
    out = job.out_dir(tmp_path)
    call = demo.StageJob(job, tmp_path, threads=1)

    returned = call()
    first = json.loads((out / "results.json").read_text())
    assert returned == {"name": "T1w", **first["metrics"]}  # what the demo's table reads is what the job returns
    assert first["resumes"] == [] and first["steps"] == EPOCHS * STEPS_PER_EPOCH
    checkpoints = [e.step for e in CheckpointStore(out / "checkpoints").entries()]
    assert checkpoints == [STEPS_PER_EPOCH, EPOCHS * STEPS_PER_EPOCH]  # one per epoch end
    weights = final_weights(out)

    # Preempted after epoch 1: only that epoch's checkpoint is left, no outputs.
    for name in ("last.pt", "results.json", f"checkpoints/step-{EPOCHS * STEPS_PER_EPOCH:08d}.pt"):
        (out / name).unlink()
    call.checkpoint().dump(tmp_path / "requeued.pkl")
    requeued = submitit.helpers.DelayedSubmission.load(tmp_path / "requeued.pkl")

    again = requeued.result()
    second = json.loads((out / "results.json").read_text())
    assert [r["step"] for r in second["resumes"]] == [STEPS_PER_EPOCH]
    assert second["steps"] == first["steps"]
    assert second["history"] == first["history"] and second["metrics"] == first["metrics"]
    assert again == returned
    resumed_weights = final_weights(out)
    assert resumed_weights.keys() == weights.keys()
    assert all(torch.equal(resumed_weights[k], weights[k]) for k in weights)
