"""Validation of the ``metrics`` section: the Evaluator's options and how "the teacher" and its CAMs are formed."""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hpckd.config.checks import at_least, choose, positive, within
from hpckd.config.schema import EvaluatorOptions
from hpckd.metrics.calibration import WEIGHTINGS
from hpckd.metrics.attention import IOU_FORMS
from hpckd.metrics.evaluator import FIDELITY_REDUCTIONS, MI_ESTIMATORS
from hpckd.metrics.fidelity import KL_DIRECTIONS
from hpckd.teachers.ensemble import REDUCTIONS

CAM_TARGETS = ("predicted", "true", "sum")
CAM_SIZES = ("map", "input")
VIT_ATTENTIONS = ("cls", "rollout")
TEACHER_PRECISIONS = ("fp32", "bf16")


def evaluator_options(metrics: Any) -> EvaluatorOptions:
    """The :class:`EvaluatorOptions` part of a ``metrics`` config section."""
    values = OmegaConf.to_container(metrics) if isinstance(metrics, DictConfig) else dataclasses.asdict(metrics)
    return EvaluatorOptions(**{f.name: values[f.name] for f in dataclasses.fields(EvaluatorOptions)})


def check_metrics_section(metrics: Any) -> None:
    """One line naming the ``metrics.*`` key of the first bad value (the Evaluator re-checks its own options)."""
    choose("metrics.ensemble", metrics.ensemble, REDUCTIONS)
    choose("metrics.cam_target", metrics.cam_target, CAM_TARGETS)
    choose("metrics.ece_weighting", metrics.ece_weighting, WEIGHTINGS)
    choose("metrics.kl_direction", metrics.kl_direction, KL_DIRECTIONS)
    choose("metrics.mi_estimator", metrics.mi_estimator, MI_ESTIMATORS)
    choose("metrics.fidelity_reduction", metrics.fidelity_reduction, FIDELITY_REDUCTIONS)
    choose("metrics.cam_iou_form", metrics.cam_iou_form, IOU_FORMS)
    choose("metrics.cam_size", metrics.cam_size, CAM_SIZES)
    choose("metrics.vit_attention", metrics.vit_attention, VIT_ATTENTIONS)
    choose("metrics.teacher_precision", metrics.teacher_precision, TEACHER_PRECISIONS)
    within("metrics.cam_threshold", metrics.cam_threshold, 0.0, 1.0)
    at_least("metrics.n_bins", metrics.n_bins, 1)
    positive("metrics.kl_temperature", metrics.kl_temperature)
    positive("metrics.kl_scale", metrics.kl_scale)
    at_least("metrics.tstddev_group_size", metrics.tstddev_group_size, 1, "samples per group; the paper uses 640")
    at_least("metrics.tstddev_rows_per_position", metrics.tstddev_rows_per_position, 1)
    for k in metrics.topk:
        at_least("metrics.topk", k, 1)
