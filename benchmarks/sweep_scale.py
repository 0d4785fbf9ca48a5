"""How long `hpckd sweep plan` and `hpckd sweep status` take for a 1,000-trial sweep (a benchmark, not a test).

    .venv/bin/python benchmarks/sweep_scale.py [--out /tmp/sweep-scale] [--seeds 8]

The generated sweep is the attention study's grid with five policies (n, w, s, a = autoaugment, r = randaugment)
for two teachers and the student (125 trials) times ``--seeds`` seeds: 1,000 trials and 80 distinct teachers with
the default 8 seeds. It measures, in this process (after the imports, which are timed apart):

* plan: expanding and validating every trial's experiment config (``plan_sweep``) and formatting the plan
  (which counts the MACs of each distinct model once for the GPU-hours estimate);
* prepare: writing ``sweep.json`` and every job's ``config.yaml`` (what `hpckd sweep run` does before submitting);
* status: reading every job's state files with a mix of states (local-executor records, so no scheduler is
  queried; on SLURM, status adds one ``sacct`` call per stage, independent of the number of trials).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model, load_average  # benchmarks/machine.py, next to this script


def hardware() -> str:
    cpu, load = cpu_model(), load_average()
    return (f"{cpu}, {os.cpu_count()} logical CPUs (load average {load:.1f}), {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}")


def sweep_config(out: Path, seeds: int) -> dict:
    letters = {"n": "none", "w": "weak", "s": "strong", "a": "autoaugment", "r": "randaugment"}
    return {
        "name": "scale", "out_dir": str(out),
        "base": {"data": {"root": str(out / "no-data"), "batch_size": 128}, "optim": {"epochs": 240}},
        "datasets": {"cifar100": {"overrides": [], "train_images": 50000, "num_classes": 100}},
        "seeds": list(range(seeds)),
        "teachers": {"T1": {"overrides": ["model.arch=resnet56"], "seed_offset": 100},
                     "T2": {"overrides": ["model.arch=resnet56"], "seed_offset": 200}},
        "student_overrides": ["model.arch=resnet20"],
        "grid": {"roles": ["T1", "T2"], "letters": letters},
        "evaluate": ["val_augmented"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="sweep folder to write (default: a temporary folder, removed)")
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sweep-scale-")) / "sweep"

    print(f"hardware: {hardware()}")
    t0 = time.perf_counter()
    from hpckd.sweep.jobs import write_state
    from hpckd.sweep.runner import format_plan, format_progress, format_status, prepare, sweep_status
    from hpckd.sweep.spec import plan_sweep
    print(f"imports: {time.perf_counter() - t0:.2f} s (torch, omegaconf, submitit; paid by every hpckd command)")

    t0 = time.perf_counter()
    plan = plan_sweep(None, inline=sweep_config(out, args.seeds))
    t_plan = time.perf_counter() - t0
    t0 = time.perf_counter()
    text = format_plan(plan)
    t_format = time.perf_counter() - t0
    print(f"plan: {len(plan.trials)} trials, {len(plan.teachers)} teachers, {len(plan.jobs)} jobs: expand + validate "
          f"{t_plan:.2f} s, format with the GPU-hours estimate {t_format:.2f} s")
    print("  " + text.splitlines()[-1])

    t0 = time.perf_counter()
    prepare(plan)
    print(f"prepare: sweep.json + {sum(j.stage != 'evaluation' for j in plan.jobs.values())} config.yaml files "
          f"{time.perf_counter() - t0:.2f} s")

    # A mix of states: every data/teacher job done, students done / running / failed / new, evaluations new.
    for i, job in enumerate(plan.jobs.values()):
        record = {"executor": "local", "job_id": str(os.getpid()), "pid": os.getpid(), "array_id": "0",
                  "stderr": str(out / "log.err")}
        if job.stage in ("data", "teachers") or (job.stage == "students" and i % 4 == 0):
            write_state(job.folder, job.stage, "done", {"config_hash": job.config_hash, "time": "2026-01-01T00:00:00+00:00"})
            if job.stage != "data":
                (job.folder / "results.json").write_text('{"metrics": {"accuracy": 0.5}}')
        elif job.stage == "students" and i % 4 == 1:
            write_state(job.folder, job.stage, "job", record)
            write_state(job.folder, job.stage, "started", {"time": "2026-01-01T00:00:00+00:00", "attempt": 1})
        elif job.stage == "students" and i % 4 == 2:
            write_state(job.folder, job.stage, "job", record)
            write_state(job.folder, job.stage, "error", {"error": "RuntimeError: boom", "time": "2026-01-01T00:00:00+00:00"})
    t0 = time.perf_counter()
    rows = sweep_status(out)
    table = format_status(rows)
    print(f"status: {len(rows)} jobs in {time.perf_counter() - t0:.2f} s -> {table.splitlines()[-1]}")
    t0 = time.perf_counter()
    live = format_progress(rows)
    print(f"--wait table (one redraw): {1000 * (time.perf_counter() - t0):.1f} ms")
    print("  " + "\n  ".join(live.splitlines()))
    if not args.out:
        shutil.rmtree(out.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
