"""The demo's (and every sweep's) teacher and student jobs are submitit ``Checkpointable`` jobs
(:class:`hpckd.sweep.jobs.SweepTrainJob`) that run the config stored in their own folder.

A small sweep shaped like the demo (two teachers T1w/T2s, one student distilled from both) runs on submitit's real
local executor, and the callables it pickled are checked; a finished job is not submitted again. A teacher job then
trains for real on a tiny data set (4 classes x 16 images, the demo's batch of 32 -> 2 steps per epoch, 2 epochs),
is "preempted" after its first epoch (its final checkpoint and outputs deleted, as if the job had stopped there), and
the job that its ``checkpoint()`` hands submitit -- pickled and loaded back, as a requeue does -- resumes and ends
exactly where the uninterrupted job ended.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import submitit
import torch

from hpckd.checkpoint import CheckpointStore, load_checkpoint
from hpckd.data.synth import SynthSpec, write_imagefolder
from hpckd.sweep import demo
from hpckd.sweep.jobs import SweepTrainJob, read_state
from hpckd.sweep.runner import make_call, prepare, run_sweep, sweep_status
from hpckd.sweep.spec import plan_sweep

CLASSES, PER_CLASS, VAL_PER_CLASS = 4, 16, 4
BATCH = 32  # the demo's data.batch_size
EPOCHS = 2
STEPS_PER_EPOCH = CLASSES * PER_CLASS // BATCH  # 2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo_jobs_data")
    write_imagefolder(root, SynthSpec(classes=CLASSES, per_class=PER_CLASS, val_per_class=VAL_PER_CLASS, seed=3))
    return root


def small_sweep(data_root: Path, out: Path, epochs: int = 1):
    """The demo's shape on the tiny set: T1w and T2s (resnet8 to keep it quick), one student from both."""
    inline = {
        "name": "demo-jobs", "base": {"data": {"batch_size": BATCH, "loader": "torch", "num_workers": 0},
                                      "optim": {"lr": 0.05, "epochs": epochs}, "model": {"arch": "resnet8"}},
        "datasets": {"tiny": {"overrides": [f"data.root={data_root}"]}},
        "teachers": {"T1": {"overrides": ["seed=1"]}, "T2": {"overrides": ["seed=2"]}},
        "student_overrides": ["seed=3", "loss.name=ensemble_kd", "loss.tau=4"],
        "grid": {"roles": ["T1", "T2"], "teacher_letters": {"T1": ["w"], "T2": ["s"]}, "student_letters": ["w"]},
        "local_parallel": 2,
    }
    return plan_sweep(None, inline=inline, out_dir=out)


def submitted_calls(folder: Path) -> list:
    """What submitit's local executor really ran: the callables it pickled for each job, in job-id order."""
    files = sorted(folder.glob("*_submitted.pkl"), key=lambda f: int(f.name.split("_")[0]))
    return [submitit.helpers.DelayedSubmission.load(f).function for f in files]


@pytest.mark.slow  # submitit's local executor trains each job in its own process
def test_a_sweep_submits_checkpointable_jobs_and_does_not_resubmit_finished_ones(data_root, tmp_path):
    plan = small_sweep(data_root, tmp_path)
    assert [j.name for j in plan.teachers] == ["T1w", "T2s"] and [j.name for j in plan.trials] == ["T1wT2sSw"]
    run_sweep(plan, "local", echo=lambda line: None)
    calls = submitted_calls(tmp_path / "submitit" / "teachers")
    assert len(calls) == 2
    for job, call in zip(plan.teachers, calls):
        assert isinstance(call, submitit.helpers.Checkpointable)  # what makes submitit requeue it on preemption
        assert isinstance(call, SweepTrainJob) and call.mode == "train"
        assert call.config == str(job.folder / "config.yaml") and call.overrides == []
        assert call.threads == max(1, (os.cpu_count() or 2) // 2)  # each job runs on its share of the CPUs
        results = json.loads((job.folder / "results.json").read_text())
        assert results["steps"] == STEPS_PER_EPOCH and results["config"]["out_dir"] == str(job.folder)
    (student_call,) = submitted_calls(tmp_path / "submitit" / "students")
    assert student_call.mode == "distill"
    stored = json.loads((plan.trials[0].folder / "results.json").read_text())["config"]["teachers"]
    assert [t["checkpoint"] for t in stored] == [str(j.folder / "last.pt") for j in plan.teachers]
    assert [r.state for r in sweep_status(tmp_path)] == ["done"] * 4

    # T2s's results lost: only T2s runs again (its checkpoint is there: it resumes at its last step).
    (plan.teachers[1].folder / "results.json").unlink()
    first_ids = {j.key: read_state(j.folder, j.stage, "job")["job_id"] for j in plan.jobs.values()}
    run_sweep(small_sweep(data_root, tmp_path), "local", echo=lambda line: None)
    again = {j.key: read_state(j.folder, j.stage, "job")["job_id"] for j in plan.jobs.values()}
    assert [key for key in first_ids if again[key] != first_ids[key]] == ["teachers/T2s"]
    assert len(submitted_calls(tmp_path / "submitit" / "teachers")) == 3
    assert [r.state for r in sweep_status(tmp_path)] == ["done"] * 4


def test_the_demo_is_the_shipped_sweep_config(tmp_path):
    plan = demo.demo_plan(tmp_path, epochs_scale=0.5)
    assert [j.name for j in plan.teachers] == ["T1w", "T2s"]
    assert [j.name for j in plan.trials] == ["T1wT2sSw", "T1wT2sSs", "Sw-CE-only"]
    assert {j.config["optim"]["epochs"] for j in [*plan.teachers, *plan.trials]} == {6}
    assert [(j.config["aug"], j.config["seed"], j.config["model"]["arch"]) for j in plan.teachers] == [
        ("weak", 1, "resnet20"), ("strong", 2, "resnet20")]
    assert [(j.config["aug"], j.config["loss"]["name"]) for j in plan.trials] == [
        ("weak", "ensemble_kd"), ("strong", "ensemble_kd"), ("weak", "ce")]
    # the data stage generates demo.DATA_SPEC (what `prepare_data` makes) at OUT/data, where it always was
    (data,) = plan.stage("data")
    spec = demo.DATA_SPEC
    assert data.extra["synth"] == {"classes": spec.classes, "per_class": spec.per_class, "size": "32x32",
                                   "val_per_class": spec.val_per_class, "seed": spec.seed}
    assert data.config["data"]["root"] == str(tmp_path / "data") and (spec.height, spec.width) == (32, 32)


def test_checkpoint_resubmits_an_equivalent_job(data_root, tmp_path):
    plan = small_sweep(data_root, tmp_path, epochs=3)
    prepare(plan)
    call = make_call(plan.teachers[1], threads=3)
    delayed = call.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    delayed.dump(tmp_path / "requeued.pkl")  # what submitit's handler writes before it requeues the job
    requeued = submitit.helpers.DelayedSubmission.load(tmp_path / "requeued.pkl")
    assert isinstance(requeued.function, SweepTrainJob)
    assert requeued.args == () and requeued.kwargs == {}
    folder = str(plan.teachers[1].folder)
    expected = {"mode": "train", "config": f"{folder}/config.yaml", "overrides": [], "folder": folder,
                "stage": "teachers", "config_hash": plan.teachers[1].config_hash, "threads": 3}
    assert vars(requeued.function) == vars(call) == expected


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "last.pt")["model"]


def test_a_teacher_job_trains_and_its_requeued_self_resumes_exactly(data_root, tmp_path, one_torch_thread):
    plan = small_sweep(data_root, tmp_path, epochs=EPOCHS)
    prepare(plan)
    job = plan.teachers[0]
    out = job.folder
    call = make_call(job, threads=1)

    returned = call()
    first = json.loads((out / "results.json").read_text())
    assert returned["metrics"] == first["metrics"] and returned["name"] == "T1w"
    assert first["resumes"] == [] and first["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert read_state(out, "teachers", "done")["config_hash"] == job.config_hash
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
    assert again["metrics"] == returned["metrics"]
    assert read_state(out, "teachers", "started")["attempt"] == 2  # the requeued job recorded its second start
    resumed_weights = final_weights(out)
    assert resumed_weights.keys() == weights.keys()
    assert all(torch.equal(resumed_weights[k], weights[k]) for k in weights)
