"""``hpckd demo`` (and ``make demo``): the sweep ``configs/sweeps/demo.yaml`` run by the sweep code on this machine.

A mini attention study: the data stage writes scikit-learn's handwritten digits as an ImageFolder (once); four
teachers (T1, T2 x weak, strong augmentation) train; the 8 students of the grid distil from every teacher pair and
the 2 baselines learn alone; the evaluation stage adds the augmented validation pass (Affinity); the report stage
writes ``report.html``. The demo ends with the report's terminal table and the path of ``report.html``.
Finished jobs are not run again: a re-run resumes where the demo stopped. SIGINT/SIGTERM to the driver cancels
the running stage jobs (they checkpoint and stop) and ends the demo with one line
(:class:`hpckd.sweep.executor.SweepStopped`).
"""

from __future__ import annotations

import os
from pathlib import Path

from hpckd.data.synth import SynthSpec
from hpckd.sweep.jobs import ensure_synth
from hpckd.sweep.runner import run_sweep
from hpckd.sweep.spec import Plan, plan_sweep

DEMO_SWEEP = Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "demo.yaml"
DEMO_EPOCHS = 6  # optim.epochs of demo.yaml's base


def prepare_data(data_root: str | os.PathLike, spec: SynthSpec = SynthSpec(classes=10, per_class=150,
                                                                            val_per_class=30, seed=0)) -> str:
    """Generate a synthetic data set unless the complete set is there (what a sweep's ``synth`` data stage does)."""
    return ensure_synth(data_root, spec)


def demo_plan(out: str | os.PathLike, epochs_scale: float = 1.0, mini: bool = False) -> Plan:
    """The demo sweep writing into ``out``, every run's epochs scaled by ``epochs_scale`` (at least 1); ``mini``:
    its ``mini`` override set (a few trials, one epoch, 16 px digits: the smoke test of the whole path)."""
    overrides = [] if epochs_scale == 1.0 else [f"optim.epochs={max(1, round(DEMO_EPOCHS * epochs_scale))}"]
    return plan_sweep(DEMO_SWEEP, out_dir=Path(out), experiment_overrides=overrides, mini=mini)


def run_demo(out: str | os.PathLike, executor: str = "local", epochs_scale: float = 1.0, mini: bool = False) -> int:
    """Run the demo; prints the report's table and the path of report.html. Returns 0, or 1 when a job failed
    (the report then says which, and a re-run redoes only what is missing)."""
    from hpckd.report import summary_table

    plan = demo_plan(out, epochs_scale, mini)
    print(f"demo sweep {DEMO_SWEEP.name}: {len(plan.teachers)} teachers, {len(plan.trials)} students -> {plan.root}",
          flush=True)
    rows = run_sweep(plan, executor, wait=True, echo=lambda line: print(f"  {line}", flush=True))
    print(summary_table(plan.root))
    html = plan.root / "report" / "report.html"
    print(f"report: {html}" if html.is_file() else f"no report was written (see `hpckd sweep status {plan.root}`)")
    return 1 if any(r.state in ("failed", "blocked") for r in rows) else 0
