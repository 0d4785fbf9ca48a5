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
        "local_parallel": 2, "report": False,  # the report stage: tests/test_sweep_features.py
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
    """`hpckd demo` is configs/sweeps/demo.yaml: a mini attention study on scikit-learn's digits -- the 8 T?T?S?
    trials of a 2-teacher grid over {w, s} and the baselines Sw, Ss, 4 distinct teachers, evaluation, report."""
    plan = demo.demo_plan(tmp_path, epochs_scale=0.5)
    assert plan.sweep.study == "attention"
    assert sorted(j.name for j in plan.teachers) == ["T1s", "T1w", "T2s", "T2w"]
    grid = [f"T1{a}T2{b}S{c}" for a in "ws" for b in "ws" for c in "ws"]
    assert sorted(j.name for j in plan.trials) == sorted([*grid, "Sw", "Ss"])
    assert {j.config["optim"]["epochs"] for j in [*plan.teachers, *plan.trials]} == {demo.DEMO_EPOCHS // 2}
    policy = {"w": "weak", "s": "strong"}
    for t in plan.teachers:  # T<role><letter>: seed = role, augmentation = letter
        assert (t.config["aug"], t.config["seed"]) == (policy[t.name[2]], int(t.name[1]))
    for trial in plan.trials:
        teachers = sorted(d.split("/", 1)[1] for d in trial.deps if d.startswith("teachers/"))
        assert teachers == sorted([trial.name[0:3], trial.name[3:6]] if len(trial.name) == 8 else [])
        assert trial.config["aug"] == policy[trial.name[-1]]
        assert trial.config["loss"]["name"] == ("ensemble_kd" if teachers else "ce")
    assert len(plan.stage("evaluation")) == 10 and plan.jobs["report/report"].stage == "report"
    (data,) = plan.stage("data")  # the digits, written in the data stage at OUT/data
    assert data.extra["digits"] == {"size": 32, "val_fraction": 0.2, "seed": 0}
    assert data.config["data"]["root"] == str(tmp_path / "data")


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
                "stage": "teachers", "config_hash": plan.teachers[1].config_hash, "threads": 3,
                "data_folder": str(tmp_path / "datasets" / "tiny")}  # whose fingerprints its results must match
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


@pytest.mark.slow  # the whole demo path in subprocesses: data, 2 teachers, 3 students, evaluation, report
def test_the_mini_demo_runs_every_stage_and_ends_with_its_report(tmp_path):
    from tests.helpers import run_hpckd

    out = tmp_path / "demo"
    proc = run_hpckd("demo", "--mini", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    html = out / "report" / "report.html"
    assert lines[-1] == f"report: {html}" and html.stat().st_size > 0
    for trial in ("T1wT2sSw", "T1wT2sSs", "Sw"):  # the summary table and the report list every trial
        assert any(line.split() and line.split()[0] == trial for line in lines), proc.stdout
        assert trial in html.read_text()
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["study"] == "attention" and manifest["mini"] is True
    assert all(r.state == "done" for r in sweep_status(out))
    # the digits data set, 16 px as the mini set says, and the augmented pass of the evaluation stage
    assert json.loads((out / "datasets" / "digits" / "index.json").read_text())["train"] == 1438
    assert next((out / "data" / "val").rglob("*.png")).stat().st_size > 0
    evaluated = json.loads((out / "trials" / "Sw" / "results.json").read_text())
    stored = evaluated["eval"]
    assert {"val", "val_augmented", "val_affinity"} <= set(stored)  # Affinity's clean and augmented passes
