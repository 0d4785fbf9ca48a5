"""How the logits of N teachers (1 to any) reach the loss, and which single distribution metrics call "the teacher".

Three modes (``EnsembleConfig.mode``), each from a reference study:

* ``mean_logits``: ``z_t = (1/m) sum_i z_i`` -- averaging logits before the softmax (the attention study's text:
  "the logits or outputs of different teachers are first averaged and then computed with the student").
* ``mean_probs``: ``z_t = log((1/m) sum_i softmax(z_i))`` -- the fidelity study's ensemble (Stanton et al. 2021,
  Sec. 3), the log of the ensemble model average. Combined at temperature 1; the loss then tempers ``z_t`` like any
  logits (``softmax(z_t / tau)``), as the fidelity study does.
* ``per_teacher_loss``: keep the m logits; the loss averages m per-teacher KD terms,
  ``L = L_NLL + (1/m) sum_i L_KD(z_s, z_i)`` (the attention study, Guo et al., Eq. 8).

:func:`combine` always returns a list, so the loss can always average over it: a one-element list for the two
``mean_*`` modes, the m logits for ``per_teacher_loss``. With one teacher all three modes give the same KD term
(``mean_probs`` returns ``log_softmax(z)``, which differs from ``z`` by a per-row constant that every softmax
ignores).

Metrics need one distribution for "the teacher ensemble" even when the loss uses ``per_teacher_loss``:
``EnsembleConfig.metrics_mode`` picks it and defaults to ``mean_probs``, because the ensemble's predictive
distribution is the mixture of its members' -- the object whose agreement and KL the fidelity study measures --
while a mean of logits is a product of experts that is more confident than any member.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hpckd.errors import ConfigError

ENSEMBLE_MODES: tuple[str, ...] = ("mean_logits", "mean_probs", "per_teacher_loss")
METRICS_MODES: tuple[str, ...] = ("mean_probs", "mean_logits")


@dataclass
class EnsembleConfig:
    """How teachers combine. Meant to sit in the experiment config as ``ensemble``."""

    mode: str = "per_teacher_loss"  # mean_logits | mean_probs | per_teacher_loss (attention study Eq. 8)
    metrics_mode: str = "mean_probs"  # mean_probs (fidelity study Sec. 3) | mean_logits: "the teacher" for metrics

    def __post_init__(self) -> None:
        check_mode(self.mode, ENSEMBLE_MODES, "ensemble.mode")
        check_mode(self.metrics_mode, METRICS_MODES, "ensemble.metrics_mode")


def check_mode(mode: str, allowed: Sequence[str], key: str) -> None:
    if mode not in allowed:
        raise ConfigError(f"config: '{key}' is {mode!r}; choose one of {', '.join(allowed)}")


def _stack(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(logits) == 0:
        raise ValueError("an ensemble needs at least one teacher's logits")
    shapes = {tuple(t.shape) for t in logits}
    if len(shapes) != 1:
        raise ValueError(f"teacher logits differ in shape: {sorted(shapes)}")
    return torch.stack([t.float() for t in logits])


def mean_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """(1/m) sum_i z_i, in fp32."""
    return _stack(logits).mean(dim=0)


def mean_probs(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log((1/m) sum_i softmax(z_i)) (fidelity study Sec. 3), computed as logsumexp of log-softmaxes, in fp32."""
    stacked = _stack(logits)
    return torch.logsumexp(torch.log_softmax(stacked, dim=-1), dim=0) - math.log(stacked.shape[0])


def combine(logits: Sequence[torch.Tensor], mode: str) -> list[torch.Tensor]:
    """The list of teacher logits the loss averages its KD term over (see the module docstring)."""
    check_mode(mode, ENSEMBLE_MODES, "ensemble.mode")
    if mode == "mean_logits":
        return [mean_logits(logits)]
    if mode == "mean_probs":
        return [mean_probs(logits)]
    _stack(logits)  # same validation as the other modes
    return list(logits)


def ensemble_distribution(logits: Sequence[torch.Tensor], mode: str = "mean_probs") -> torch.Tensor:
    """One (N, C) logit tensor standing for the whole ensemble, for metrics (``metrics_mode``)."""
    check_mode(mode, METRICS_MODES, "ensemble.metrics_mode")
    return mean_probs(logits) if mode == "mean_probs" else mean_logits(logits)
