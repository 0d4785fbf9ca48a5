"""Distillation losses of the four studies, each returning a dict of named terms.

``build_loss(cfg)(student_logits, teacher_logits, batch) -> {"loss": total, "ce": ..., "kd": ...}``.
See :mod:`hpckd.config.methods` for the config layout (shared fields, per-method subsections) and the weight
(alpha) convention, and :mod:`hpckd.losses.recipes` for the values that reproduce each paper.
"""

from hpckd.config.methods import DAConfig, LossConfig, TargetsConfig, WSLConfig
from hpckd.losses.base import Loss
from hpckd.losses.checks import NonFiniteError, check_loss_finite
from hpckd.losses.recipes import RECIPES, recipe
from hpckd.losses.registry import available, build_loss, register

__all__ = [
    "RECIPES",
    "DAConfig",
    "Loss",
    "LossConfig",
    "NonFiniteError",
    "TargetsConfig",
    "WSLConfig",
    "available",
    "build_loss",
    "check_loss_finite",
    "recipe",
    "register",
]
