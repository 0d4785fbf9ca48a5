"""Validation of the ``loss`` config section (:class:`hpckd.config.methods.LossConfig`, where the layout and the
weight convention are documented): ranges, choices, and ``alpha`` resolved into the two weights.

The shared fields are checked by :func:`validated`; each method family's subsection by its own checker in
:data:`SECTION_CHECKS` (``loss.da``, ``loss.wsl``, ``loss.targets``). Every mistake is one
:class:`~hpckd.errors.ConfigError` line naming the full dotted key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from hpckd.config.checks import at_least, choose, positive, within
from hpckd.config.methods import DAConfig, LossConfig, TargetsConfig, WSLConfig
from hpckd.errors import ConfigError
from hpckd.losses.targets import SUBSETS
from hpckd.teachers.ensemble import ENSEMBLE_MODES

KD_FORMS = ("cross_entropy", "kl")
WEIGHT_TAUS = ("tau", "one")
SMOOTHING_FORMS = ("eq3", "code")
REPLACE_RULES = ("none", "full", "partial", "confidence")
MANIPULATIONS = ("none", "label_smoothing", "teacher_amplification", "student_amplification")


def validated(loss: LossConfig) -> LossConfig:
    """Check ranges and choices of ``loss`` and its subsections; resolve ``alpha`` into the two weights.
    Returns a new config (the subsections are shared with ``loss``: nothing here changes them)."""
    cfg = dataclasses.replace(loss)
    if cfg.alpha is not None:
        if not 0.0 <= cfg.alpha <= 1.0:
            raise ConfigError(f"loss.alpha is {cfg.alpha}; it is the hard-label weight, choose a value in [0, 1]")
        implied = (float(cfg.alpha), 1.0 - float(cfg.alpha))
        if (cfg.ce_weight, cfg.kd_weight) not in ((1.0, 1.0), implied):  # (1, 1): the defaults
            raise ConfigError(
                "loss.alpha and loss.ce_weight/kd_weight are both set: use alpha (hard-label weight) or the weights"
            )
        cfg.ce_weight, cfg.kd_weight = implied
    positive("loss.tau", cfg.tau, "a temperature")
    positive("loss.teacher_tau", cfg.teacher_tau, "a temperature")
    at_least("loss.ce_weight", cfg.ce_weight, 0.0)
    at_least("loss.kd_weight", cfg.kd_weight, 0.0)
    within("loss.label_smoothing", cfg.label_smoothing, 0.0, 1.0)
    choose("loss.kd_form", cfg.kd_form, KD_FORMS)
    choose("loss.ensemble", cfg.ensemble, ENSEMBLE_MODES)
    for name, check in SECTION_CHECKS.items():
        check(getattr(cfg, name), f"loss.{name}")
    return cfg


def check_da(section: DAConfig, key: str) -> None:
    """``loss.da``: the weight of the augmented half's KL (kd_da)."""
    at_least(f"{key}.aug_kd_weight", section.aug_kd_weight, 0.0)


def check_wsl(section: WSLConfig, key: str) -> None:
    """``loss.wsl``: the temperature of the WSL weight's CEs."""
    choose(f"{key}.weight_tau", section.weight_tau, WEIGHT_TAUS)


def check_targets(section: TargetsConfig, key: str) -> None:
    """``loss.targets``: the soft-target rules of the response-based study (Eqs. 1-5)."""
    choose(f"{key}.replace", section.replace, REPLACE_RULES)
    choose(f"{key}.manipulate", section.manipulate, MANIPULATIONS)
    choose(f"{key}.subset", section.subset, SUBSETS)
    at_least(f"{key}.amplify_delta", section.amplify_delta, 0.0)
    within(f"{key}.smoothing", section.smoothing, 0.0, 1.0)
    choose(f"{key}.smoothing_form", section.smoothing_form, SMOOTHING_FORMS)


# subsection name -> its checker (every dataclass-typed field of LossConfig has one; a test holds that)
SECTION_CHECKS: dict[str, Callable] = {"da": check_da, "wsl": check_wsl, "targets": check_targets}
