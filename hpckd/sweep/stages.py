"""Multi-stage distillation runs: the response-based study's Efficient Distillation (Sec. 5.2).

Stage 1 distils from the teacher of the config with the WSL loss; stage 2 starts from stage 1's student, swaps in
a stronger teacher of the same architecture and trains with consistent knowledge mining (teacher tau 0.7, student
tau 1) at a new learning rate and weight decay (:func:`hpckd.losses.recipes.efficient_distillation_stages`). Each
stage is an ordinary `hpckd distill` run in its own folder, so each resumes on its own and a finished stage is
not run again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from hpckd.train.experiment import load_experiment
from hpckd.errors import ConfigError
from hpckd.losses.recipes import efficient_distillation_stages


def stage_configs(config: str | None, overrides: Sequence[str], strong_teacher: str, total_epochs: int) -> list:
    """One experiment config per stage (stage 2 starts from stage 1's ``last.pt``)."""
    base = load_experiment(config, overrides)
    if len(base.teachers) != 1:
        raise ConfigError("efficient distillation starts from exactly one teacher in 'teachers' (the weaker one)")
    out = Path(base.out_dir)
    configs, previous = [], None
    for stage in efficient_distillation_stages(total_epochs):
        cfg = load_experiment(config, [*overrides, *stage.overrides, f"optim.epochs={stage.epochs}",
                                   f"out_dir={out / stage.name}", f"name={base.name}-{stage.name}"])
        cfg.loss = OmegaConf.merge(OmegaConf.structured(type(stage.loss)), dataclasses.asdict(stage.loss))
        if stage.teacher == "second":
            cfg.teachers[0].checkpoint = strong_teacher
            cfg.model.weights = str(out / previous / "last.pt")  # stage 2 continues stage 1's student
            cfg.optim.min_lr = 5e-4  # cosine down to 5e-4 (Sec. 5.2)
        configs.append(cfg)
        previous = stage.name
    return configs


def run_efficient_distillation(config: str | None, overrides: Sequence[str], strong_teacher: str,
                               total_epochs: int) -> list[dict[str, Any]]:
    from hpckd.train.engine import run

    results = []
    for cfg in stage_configs(config, overrides, strong_teacher, total_epochs):
        done = Path(cfg.out_dir) / "results.json"
        if done.is_file():  # a finished stage is not run again
            results.append(json.loads(done.read_text()))
            continue
        results.append(run(cfg, mode="distill"))
    return results
