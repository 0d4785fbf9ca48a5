"""The embedded default sweep behind ``hpckd demo`` (and ``make demo``).

Stages, each one array job on the chosen executor (submitit's local executor by default, SLURM on a cluster):
  0. generate a 10-class JPEG data set (32x32) unless the complete set is there already (a set that a killed
     demo left half-written is generated again: :func:`hpckd.data.synth.is_complete`);
  1. teachers: T1 trained with weak augmentation, T2 with strong augmentation (CE);
  2. students: one per trial, distilled from the ensemble {T1, T2} with the attention study's ensemble KD loss,
     the student trained with weak (T1wT2sSw) or strong (T1wT2sSs) augmentation, plus a CE-only baseline;
  3. report: a table of trial, student val accuracy and top-1 agreement with the teacher ensemble, read from the
     ``results.json`` files only.
Finished stages are not run again: a re-run resumes where the sweep stopped. The teacher and student jobs are
:class:`StageJob` objects, ``submitit.helpers.Checkpointable`` like every hpckd training job: on SLURM a preempted
(or timed-out) stage job checkpoints at the next step, is requeued, and resumes from its ``out_dir``.
SIGINT/SIGTERM to the driver cancels the running stage jobs (they checkpoint and stop) and ends the demo with one
line (:class:`hpckd.sweep.executor.SweepStopped`); a re-run resumes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpckd.data.synth import SynthSpec, is_complete, write_imagefolder
from hpckd.errors import UserError
from hpckd.train.job import TrainJob


@dataclass(frozen=True)
class Job:
    name: str
    mode: str  # train | distill
    overrides: tuple[str, ...]

    def out_dir(self, root: Path) -> Path:
        return root / "runs" / self.name


DATA_SPEC = SynthSpec(classes=10, per_class=150, val_per_class=30, seed=0)
TEACHER_ARCH = "resnet20"
STUDENT_ARCH = "resnet8"
TRAINING = ("data.batch_size=32", "optim.lr=0.05")  # small batches: more steps on a 1,500-image set


def teacher_jobs(data_root: Path, epochs: int) -> list[Job]:
    common = (f"data.root={data_root}", f"model.arch={TEACHER_ARCH}", f"optim.epochs={epochs}", *TRAINING)
    return [Job("T1w", "train", common + ("aug=weak", "seed=1")), Job("T2s", "train", common + ("aug=strong", "seed=2"))]


def student_jobs(data_root: Path, root: Path, epochs: int) -> list[Job]:
    teachers = f"teachers=[{{checkpoint: {root / 'runs/T1w/last.pt'}}},{{checkpoint: {root / 'runs/T2s/last.pt'}}}]"
    common = (f"data.root={data_root}", f"model.arch={STUDENT_ARCH}", f"optim.epochs={epochs}", *TRAINING, "seed=3")
    return [
        Job("T1wT2sSw", "distill", common + (teachers, "aug=weak", "loss.name=ensemble_kd", "loss.tau=4")),
        Job("T1wT2sSs", "distill", common + (teachers, "aug=strong", "loss.name=ensemble_kd", "loss.tau=4")),
        Job("Sw-CE-only", "distill", common + (teachers, "aug=weak", "loss.name=ce")),
    ]


def stage_overrides(job: Job, root: Path) -> list[str]:
    """The job's overrides plus where it writes and its name (one loader worker: stage jobs share the machine)."""
    return [*job.overrides, f"out_dir={job.out_dir(root)}", f"name={job.name}", "data.num_workers=1"]


class StageJob(TrainJob):
    """One teacher or student job of the demo, run in the executor's process on ``threads`` CPU threads.

    A :class:`~hpckd.train.job.TrainJob`, so submitit requeues it on preemption and it resumes from its
    ``out_dir`` (its checkpoint() resubmits this same object; the training state lives on disk). It returns the
    run's name and final metrics.
    """

    def __init__(self, job: Job, root: str | os.PathLike, threads: int = 1) -> None:
        super().__init__(job.mode, None, stage_overrides(job, Path(root)))
        self.threads = threads

    def __call__(self) -> dict[str, Any]:
        import torch

        # Set in the job's own process (set again after a requeue): cpus_per_task of the stage, not every core.
        torch.set_num_threads(self.threads)
        results = super().__call__()
        return {"name": results["name"], **results["metrics"]}


def run_job(job: Job, root: str, threads: int = 1) -> dict[str, Any]:
    """Run one stage job in this process and return its headline metrics (what a :class:`StageJob` returns)."""
    return StageJob(job, root, threads)()


def stage_calls(jobs: list[Job], root: Path, threads: int) -> list[StageJob]:
    """What a stage submits: one self-contained Checkpointable call per job (no arguments to pickle beside it)."""
    return [StageJob(j, root, threads) for j in jobs]


def run_stage(jobs: list[Job], root: Path, executor: str) -> None:
    todo = [j for j in jobs if not (j.out_dir(root) / "results.json").is_file()]
    if not todo:
        print(f"  already done: {', '.join(j.name for j in jobs)}")
        return
    from hpckd.sweep.executor import cancel_on_signals, collect_results, make_executor

    cpus = max(1, (os.cpu_count() or 2) // len(todo))
    ex = make_executor(executor, root / "submitit", cpus_per_task=cpus, timeout_min=60)
    print(f"  running {', '.join(j.name for j in todo)} on the {executor} executor", flush=True)
    submitted: list = []
    with cancel_on_signals(submitted):  # a signal during the submission cancels what was submitted so far
        # One array job, as map_array would submit, but of distinct Checkpointable objects: submitit only
        # checkpoints and requeues a job whose submitted function has a checkpoint() method.
        submitted.extend(ex.submit_array(stage_calls(todo, root, cpus)))
        collect_results(submitted)


def prepare_data(data_root: Path, spec: SynthSpec = DATA_SPEC) -> str:
    """Generate the demo's data set unless the complete set is there; says what it did."""
    if is_complete(data_root, spec):
        return "already there"
    counts = write_imagefolder(data_root, spec)
    return (f"generated {counts['train']} train / {counts['val']} val JPEGs ({spec.classes} classes, "
            f"{spec.height}x{spec.width})")


def read_results(root: Path, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        path = root / "runs" / name / "results.json"
        try:
            rows.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not valid JSON"
            raise UserError(f"cannot read the results of stage job {name}: {path} ({reason}); delete "
                            f"{path.parent} and rerun the demo to redo that job") from exc
        if not isinstance(rows[-1], dict) or not isinstance(rows[-1].get("metrics"), dict):
            raise UserError(f"{path} holds no metrics (not a finished run's results); delete {path.parent} and "
                            f"rerun the demo to redo that job")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'trial':<14} {'student val acc':>15} {'top-1 agreement':>16}", "-" * 47]
    for r in rows:
        m = r["metrics"]
        agree = m.get("top1_agreement")
        shown = "-" if agree is None else f"{agree:.3f}"  # teachers have no teacher to agree with
        lines.append(f"{r['name']:<14} {m['accuracy']:>15.3f} {shown:>16}")
    return "\n".join(lines)


def run_demo(out: str | os.PathLike, executor: str = "local", epochs_scale: float = 1.0) -> str:
    root = Path(out).resolve()
    data_root = root / "data"
    teacher_epochs = max(1, round(12 * epochs_scale))
    student_epochs = max(1, round(12 * epochs_scale))
    print(f"[1/4] data: {data_root}", flush=True)
    print(f"  {prepare_data(data_root)}", flush=True)
    print(f"[2/4] teachers ({TEACHER_ARCH}, {teacher_epochs} epochs): T1 weak, T2 strong augmentation")
    run_stage(teacher_jobs(data_root, teacher_epochs), root, executor)
    print(f"[3/4] students ({STUDENT_ARCH}, {student_epochs} epochs), ensemble KD from T1w + T2s")
    students = student_jobs(data_root, root, student_epochs)
    run_stage(students, root, executor)
    print("[4/4] evaluation")
    teachers = read_results(root, ["T1w", "T2s"])
    table = format_table(teachers + read_results(root, [j.name for j in students]))
    print(table)
    print(f"results: {root / 'runs'}/*/results.json")
    return table

