"""A training run as a submitit job that survives preemption: ``TrainJob(...)`` is ``submitit.helpers.Checkpointable``.

    executor = make_executor("slurm", "runs/submitit", tasks_per_node=2, timeout_min=240)
    job = executor.submit(TrainJob("distill", "configs/quickstart.yaml", ["optim.lr=0.05"]))

When SLURM warns the job (SIGUSR2, submitit's preemption/time-out signal), the training loop writes a checkpoint at
the next step boundary and then calls submitit's own handler, which calls :meth:`checkpoint` (below), requeues the
job and exits (see :mod:`hpckd.train.preempt`). The requeued job calls the same object again; ``resume=auto``
finds the checkpoint in ``out_dir``, so the run continues exactly where it stopped. Nothing of the training state
lives in this object: the checkpoint on disk is the state.
"""

from __future__ import annotations

from typing import Any, Sequence

import submitit


class TrainJob(submitit.helpers.Checkpointable):
    """``hpckd train`` / ``hpckd distill`` of one config, callable in a submitit job (and requeued on preemption)."""

    def __init__(self, mode: str, config: str | None = None, overrides: Sequence[str] = ()) -> None:
        if mode not in ("train", "distill"):
            raise ValueError(f"mode must be 'train' or 'distill', got {mode!r}")
        self.mode, self.config, self.overrides = mode, config, list(overrides)

    def __call__(self) -> dict[str, Any]:
        from hpckd import dist
        from hpckd.train.experiment import load_experiment
        from hpckd.train.engine import run

        results = run(load_experiment(self.config, self.overrides), mode=self.mode)
        dist.shutdown()
        return {"name": results["name"], "metrics": results["metrics"], "steps": results["steps"],
                "resumes": results["resumes"]}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # The training checkpoint is already on disk (written at the step boundary before submitit's handler runs);
        # requeueing the same call is enough, because it resumes from out_dir.
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
