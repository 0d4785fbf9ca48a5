"""Loss settings that reproduce each study, in this package's one weight convention (alpha = hard-label weight).

=====================  ==================  =====================================================================
recipe                 loss                source
=====================  ==================  =====================================================================
attention_study        ensemble_kd         tau = 10, "hard label weight alpha = 0.2" (App. A.1); Eqs. 6-8
attention_study_eq8    ensemble_kd         Eq. 8 as printed: L_NLL + mean_k L_KDk (weights 1 and 1), tau = 10
attention_study_zscore standardized_kd     the same with Sun et al.'s logit standardisation (Sec. 6.2)
fidelity_study         pure_kd             alpha = 0 (Sec. 3.1, 5), tau = 4 (Fig. 3 baseline), mean_probs ensemble
augmentation_study     kd_da               (1 - a) CE + a tau^2 KL, a = 0.9 -> alpha = 0.1; tau = 4 (Sec. 5, Eq. 1)
augmentation_kd        kd                  the same loss on a plain (undoubled) batch
response_analysis      soft_target_kd      MEAL V2 setting lambda = 1 (Sec. 3): ce 0, kd 1, tau 1 (Sec. 4)
efficient_stage1       wsl                 tau 2, CE (label smoothing 0.1) + 0.5 WSL (Sec. 5.2; EffDstl configs)
efficient_stage2       ckm                 teacher tau 0.7, student tau 1, t = 0.99, no CE (Sec. 5.1-5.2)
=====================  ==================  =====================================================================

:func:`efficient_distillation_stages` adds the optimiser side of the two-stage schedule (Sec. 5.2).
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass

from hpckd.config.methods import LossConfig, TargetsConfig, WSLConfig
from hpckd.errors import ConfigError
from hpckd.losses.config import validated

RECIPES: dict[str, LossConfig] = {
    "attention_study": LossConfig(name="ensemble_kd", tau=10.0, alpha=0.2),
    "attention_study_eq8": LossConfig(name="ensemble_kd", tau=10.0, ce_weight=1.0, kd_weight=1.0),
    "attention_study_zscore": LossConfig(name="standardized_kd", tau=10.0, alpha=0.2, kd_form="kl"),
    "fidelity_study": LossConfig(name="pure_kd", tau=4.0, alpha=0.0, ensemble="mean_probs"),
    "augmentation_study": LossConfig(name="kd_da", tau=4.0, alpha=0.1, kd_form="kl"),
    "augmentation_kd": LossConfig(name="kd", tau=4.0, alpha=0.1, kd_form="kl"),
    "response_analysis": LossConfig(
        name="soft_target_kd",
        tau=1.0,
        ce_weight=0.0,
        kd_weight=1.0,
        targets=TargetsConfig(manipulate="label_smoothing", subset="reg_correct"),
    ),
    "efficient_stage1": LossConfig(
        name="wsl", tau=2.0, ce_weight=1.0, kd_weight=0.5, label_smoothing=0.1, wsl=WSLConfig(weight_tau="tau")
    ),
    "efficient_stage2": LossConfig(
        name="ckm", tau=1.0, teacher_tau=0.7, ce_weight=0.0, kd_weight=1.0, targets=TargetsConfig(smoothing=0.99)
    ),
}


def recipe(name: str) -> LossConfig:
    """A copy of the named recipe, validated (alpha resolved into the weights)."""
    if name not in RECIPES:
        close = difflib.get_close_matches(name, list(RECIPES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown loss recipe '{name}'{hint}; choose one of {', '.join(sorted(RECIPES))}")
    return validated(copy.deepcopy(RECIPES[name]))  # deep: the subsections must not be shared with RECIPES


@dataclass(frozen=True)
class Stage:
    """One stage of a multi-stage distillation schedule.

    ``teacher`` says which teacher the stage distils from: ``"first"`` (the weaker one given to the run) or
    ``"second"`` (the stronger teacher of the same architecture swapped in for stage 2). ``overrides`` are
    dotted experiment-config overrides (``optim.*``) for ``hpckd.config.load_config``.
    """

    name: str
    epochs: int
    loss: LossConfig
    teacher: str
    overrides: tuple[str, ...]


STAGE_FORMS: tuple[str, ...] = ("text", "code")


def efficient_distillation_stages(total_epochs: int = 300, form: str = "text") -> list[Stage]:
    """Efficient Distillation's schedule (response-based study Sec. 5.2) over ``total_epochs`` (300 in the paper).

    ``form="text"`` (default, the paper): 240 + 60 epochs; stage 1 WSL loss, lr 0.5 for batch 1024, weight decay
    4e-5, cosine to 0; stage 2 a stronger teacher of the same architecture, consistent knowledge mining (teacher tau
    0.7, student tau 1), lr 5e-2 cosine-decayed to 5e-4 over its 60 epochs, weight decay 0.

    ``form="code"`` (the study's public code, whose stage switch fires at 0-based epoch 239): stage 1 runs 239
    epochs with a cosine floor of 1e-5; stage 2 runs 61 epochs on a cosine laid out over 62 epochs (so it stops
    one epoch short of its floor of 5e-4).

    Both forms set ``optim.lr_reference_batch=1024``: the rates are for batch 1024 and scale linearly to
    ``data.batch_size``. Shorter runs keep the proportions (4:1, or 239:61 with a one-epoch-longer stage-2 cosine).
    """
    if total_epochs < 2:
        raise ConfigError(f"efficient distillation needs at least 2 epochs (one per stage), got {total_epochs}")
    if form not in STAGE_FORMS:
        raise ConfigError(f"unknown efficient-distillation form {form!r}; choose one of {', '.join(STAGE_FORMS)}")
    share = 240 if form == "text" else 239
    first = max(1, min(total_epochs - 1, round(total_epochs * share / 300)))
    second = total_epochs - first
    floor1 = "0.0" if form == "text" else "1e-05"
    span2 = second if form == "text" else second + 1
    common = ("optim.schedule=cosine", "optim.lr_reference_batch=1024")
    return [
        Stage("stage1", first, recipe("efficient_stage1"), "first",
              ("optim.lr=0.5", "optim.weight_decay=4e-05", f"optim.min_lr={floor1}", "optim.schedule_epochs=0",
               *common)),
        Stage("stage2", second, recipe("efficient_stage2"), "second",
              ("optim.lr=0.05", "optim.weight_decay=0.0", "optim.min_lr=0.0005", f"optim.schedule_epochs={span2}",
               *common)),
    ]


def stage_at(stages: list[Stage], epoch: int) -> Stage:
    """The stage active at (0-based) ``epoch``; the last stage after the schedule ends."""
    start = 0
    for stage in stages:
        if epoch < start + stage.epochs:
            return stage
        start += stage.epochs
    return stages[-1]
