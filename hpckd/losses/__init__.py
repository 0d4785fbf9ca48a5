"""Distillation losses of the four studies, each returning a dict of named terms.

``build_loss(cfg)(student_logits, teacher_logits, batch) -> {"loss": total, "ce": ..., "kd": ...}``.
See :mod:`hpckd.losses.config` for the weight (alpha) convention and :mod:`hpckd.losses.recipes` for the
values that reproduce each paper.
"""

from hpckd.losses.base import Loss
from hpckd.losses.checks import NonFiniteError, check_loss_finite
from hpckd.losses.config import LossConfig
from hpckd.losses.recipes import RECIPES, recipe
from hpckd.losses.registry import available, build_loss, register

__all__ = [
    "RECIPES",
    "Loss",
    "LossConfig",
    "NonFiniteError",
    "available",
    "build_loss",
    "check_loss_finite",
    "recipe",
    "register",
]
