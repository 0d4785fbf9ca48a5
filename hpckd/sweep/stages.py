"""Multi-stage distillation runs: the response-based study's Efficient Distillation (Sec. 5.2).

Stage 1 distils from the teacher of the config with the WSL loss; stage 2 starts from stage 1's student, swaps in
a stronger teacher of the same architecture and trains with consistent knowledge mining (teacher tau 0.7, student
tau 1) at a new learning rate and weight decay (:func:`hpckd.losses.recipes.efficient_distillation_stages`; the
paper's 240 + 60 epochs by default, the public code's 239 + 61 with ``form="code"``). Each
stage is an ordinary `hpckd distill` run in its own folder, so each resumes on its own and a finished stage is
not run again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import OmegaConf

from hpckd.train.experiment import load_experiment, validate_experiment
from hpckd.errors import ConfigError
from hpckd.losses.recipes import efficient_distillation_stages


def stage_configs(config: str | None, overrides: Sequence[str], strong_teacher: str, total_epochs: int,
                  form: str = "text") -> list:
    """One experiment config per stage (stage 2 starts from stage 1's ``last.pt``).

    Each stage's loss is its recipe (:func:`efficient_distillation_stages`); the user's ``loss.*`` command-line
    overrides are applied on top of it in both stages (e.g. ``loss.targets.smoothing_form=code``). A config file
    that sets its own loss section is refused with one line, since the stages replace it."""
    base = load_experiment(config, overrides)
    if len(base.teachers) != 1:
        raise ConfigError("efficient distillation starts from exactly one teacher in 'teachers' (the weaker one)")
    if config is not None and _file_sets_loss(config):
        raise ConfigError(f"{config} sets a 'loss' section, which distill-efficient replaces with each stage's recipe "
                          f"(WSL, then CKM); remove it and give loss changes as loss.* overrides on the command line, "
                          f"which apply on top of both stages' recipes")
    loss_overrides = [o for o in overrides if o.split("=", 1)[0].strip().lstrip("+~").startswith("loss.")]
    other = [o for o in overrides if o not in loss_overrides]
    out = Path(base.out_dir)
    configs, previous = [], None
    for stage in efficient_distillation_stages(total_epochs, form):
        cfg = load_experiment(config, [*other, *stage.overrides, f"optim.epochs={stage.epochs}",
                                       f"out_dir={out / stage.name}", f"name={base.name}-{stage.name}"])
        loss = OmegaConf.merge(OmegaConf.structured(type(stage.loss)), dataclasses.asdict(stage.loss))
        for item in loss_overrides:  # the user's loss.* overrides, on top of the stage's recipe
            key, _, value = item.partition("=")
            OmegaConf.update(loss, key.strip().lstrip("+~")[len("loss."):], yaml.safe_load(value), merge=True)
        cfg.loss = loss
        validate_experiment(cfg)
        if stage.teacher == "second":
            cfg.teachers[0].checkpoint = strong_teacher
            cfg.model.weights = str(out / previous / "last.pt")  # stage 2 continues stage 1's student
        configs.append(cfg)
        previous = stage.name
    return configs


def _file_sets_loss(config: str) -> bool:
    try:
        data = yaml.safe_load(Path(config).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False  # load_experiment has already read it; its own errors are reported there
    return isinstance(data, dict) and "loss" in data


def run_efficient_distillation(config: str | None, overrides: Sequence[str], strong_teacher: str,
                               total_epochs: int, form: str = "text") -> list[dict[str, Any]]:
    from hpckd.train.engine import run

    results = []
    for cfg in stage_configs(config, overrides, strong_teacher, total_epochs, form):
        done = Path(cfg.out_dir) / "results.json"
        if done.is_file():  # a finished stage is not run again
            results.append(json.loads(done.read_text()))
            continue
        results.append(run(cfg, mode="distill"))
    return results
