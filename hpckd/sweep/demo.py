"""``hpckd demo`` (and ``make demo``): the sweep ``configs/sweeps/demo.yaml`` run by the sweep code on this machine.

Stages: the data set is generated (unless complete) and indexed; the two teachers train; the three students
distil from them; then a table of trial, student val accuracy and top-1 agreement with the teacher ensemble is
printed from the ``results.json`` files. Finished jobs are not run again: a re-run resumes where the demo stopped.
SIGINT/SIGTERM to the driver cancels the running stage jobs (they checkpoint and stop) and ends the demo with one
line (:class:`hpckd.sweep.executor.SweepStopped`).
"""

from __future__ import annotations

import os
from pathlib import Path

from hpckd.data.synth import SynthSpec
from hpckd.sweep.jobs import ensure_synth
from hpckd.sweep.runner import results_table, run_sweep
from hpckd.sweep.spec import Plan, plan_sweep

DEMO_SWEEP = Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "demo.yaml"
DEMO_EPOCHS = 12
DATA_SPEC = SynthSpec(classes=10, per_class=150, val_per_class=30, seed=0)  # as datasets.synth of demo.yaml


def prepare_data(data_root: str | os.PathLike, spec: SynthSpec = DATA_SPEC) -> str:
    """Generate the demo's data set unless the complete set is there (what the demo's data stage does)."""
    return ensure_synth(data_root, spec)


def demo_plan(out: str | os.PathLike, epochs_scale: float = 1.0) -> Plan:
    """The demo sweep writing into ``out``, every run's epochs scaled by ``epochs_scale`` (at least 1)."""
    epochs = max(1, round(DEMO_EPOCHS * epochs_scale))
    return plan_sweep(DEMO_SWEEP, out_dir=Path(out), experiment_overrides=[f"optim.epochs={epochs}"])


def run_demo(out: str | os.PathLike, executor: str = "local", epochs_scale: float = 1.0) -> str:
    plan = demo_plan(out, epochs_scale)
    print(f"demo sweep {DEMO_SWEEP.name}: {len(plan.teachers)} teachers, {len(plan.trials)} students -> {plan.root}",
          flush=True)
    run_sweep(plan, executor, wait=True, echo=lambda line: print(f"  {line}", flush=True))
    table = results_table(plan, strict=True)
    print(table)
    print(f"results: {plan.root}/{{teachers,trials}}/*/results.json")
    return table
