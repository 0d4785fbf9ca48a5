"""The demo's teacher and student jobs are submitit ``Checkpointable`` jobs (:class:`hpckd.sweep.demo.StageJob`).

What the demo submits is recorded through a stand-in executor; a teacher job then trains for real on a tiny data set
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
from hpckd.sweep import executor as executor_module
from hpckd.train.checkpoint import CheckpointStore, load_checkpoint

CLASSES, PER_CLASS, VAL_PER_CLASS = 4, 16, 4
BATCH = 32  # the demo's data.batch_size
EPOCHS = 2
STEPS_PER_EPOCH = CLASSES * PER_CLASS // BATCH  # 2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo_jobs_data")
    write_imagefolder(root, SynthSpec(classes=CLASSES, per_class=PER_CLASS, val_per_class=VAL_PER_CLASS, seed=3))
    return root


class RecordingExecutor:
    """Stands in for the submitit executor: keeps what is submitted, runs nothing."""

    def __init__(self, cpus_per_task: int) -> None:
        self.cpus_per_task = cpus_per_task
        self.submitted: list = []

    def submit_array(self, fns: list) -> list:
        self.submitted.extend(fns)
        return []  # no jobs to wait for


def record_stage(monkeypatch, jobs: list[demo.Job], root: Path) -> RecordingExecutor:
    made: list[RecordingExecutor] = []

    def make_executor(kind: str, folder: Path, *, cpus_per_task: int, **_: object) -> RecordingExecutor:
        made.append(RecordingExecutor(cpus_per_task))
        return made[-1]

    monkeypatch.setattr(executor_module, "make_executor", make_executor)
    demo.run_stage(jobs, root, "local")
    assert len(made) == 1
    return made[0]


def test_the_demo_submits_checkpointable_stage_jobs(monkeypatch, tmp_path):
    data = tmp_path / "data"
    for jobs in (demo.teacher_jobs(data, 3), demo.student_jobs(data, tmp_path, 3)):
        ex = record_stage(monkeypatch, jobs, tmp_path)
        assert len(ex.submitted) == len(jobs)
        for job, call in zip(jobs, ex.submitted):
            assert isinstance(call, submitit.helpers.Checkpointable)
            assert call.mode == job.mode
            # The demo's own overrides, then where the job writes and its name, as `hpckd demo` always had.
            assert call.overrides[: len(job.overrides)] == list(job.overrides)
            assert f"out_dir={tmp_path / 'runs' / job.name}" in call.overrides
            assert f"name={job.name}" in call.overrides
            # Each job runs on the CPU share the executor was asked for.
            assert call.threads == ex.cpus_per_task == max(1, (os.cpu_count() or 2) // len(jobs))


def test_a_finished_stage_is_not_submitted_again(monkeypatch, tmp_path):
    jobs = demo.teacher_jobs(tmp_path / "data", 3)
    (jobs[0].out_dir(tmp_path)).mkdir(parents=True)
    (jobs[0].out_dir(tmp_path) / "results.json").write_text("{}")
    ex = record_stage(monkeypatch, jobs, tmp_path)
    assert [c.overrides for c in ex.submitted] == [demo.stage_overrides(jobs[1], tmp_path)]


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
