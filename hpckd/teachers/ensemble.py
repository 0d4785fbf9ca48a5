"""How the logits of m teachers (1 to any) combine into one ensemble distribution: the one implementation.

The loss (``loss.ensemble``, computed in fp32, or fp64 in gradient checks) and the metrics (``metrics.ensemble``,
float64) both reduce through :func:`ensemble_distribution`. One set of mode names serves the whole project:

* ``per_teacher_loss`` (loss only; the default of ``loss.ensemble``): nothing is reduced; the loss averages m
  per-teacher KD terms, ``L = L_NLL + (1/m) sum_i L_KD(z_s, z_i)`` (the attention study, Guo et al., Eq. 8).
* ``mean_probs``: ``z_t = log((1/m) sum_i softmax(z_i))`` (:func:`mean_probs`) -- the fidelity study's ensemble
  (Stanton et al. 2021, Sec. 3), the log of the ensemble model average. Combined at temperature 1; the loss then
  tempers ``z_t`` like any logits (``softmax(z_t / tau)``), as the fidelity study does.
* ``mean_logits``: ``z_t = (1/m) sum_i z_i`` (:func:`mean_logits`) -- averaging logits before the softmax (the
  attention study, Sec. 4.2: "the logits or outputs of different teachers are first averaged and then computed
  with the student").

With one teacher all three modes give the same KD term (``mean_probs`` returns ``log_softmax(z)``, which differs
from ``z`` by a per-row constant that every softmax ignores).

Metrics need one distribution for "the teacher ensemble" even when the loss uses ``per_teacher_loss``, so
``metrics.ensemble`` offers the two reductions only (:data:`REDUCTIONS`) and defaults to ``mean_probs``: the
ensemble's predictive distribution is the mixture of its members' -- the object whose agreement and KL the fidelity
study measures, so fidelity, calibration and agreement describe the model the student is asked to imitate -- while
a mean of logits is a product of experts whose confidence differs from every member's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

ENSEMBLE_MODES: tuple[str, ...] = ("per_teacher_loss", "mean_probs", "mean_logits")  # choices of loss.ensemble
REDUCTIONS: tuple[str, ...] = ("mean_probs", "mean_logits")  # the modes that reduce to one distribution


def _stack(logits: Sequence[torch.Tensor] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(m, N, C) in ``dtype`` from m same-shape (N, C) members (a stacked (m, N, C) tensor iterates as its members)."""
    members = list(logits)
    if not members:
        raise ValueError("an ensemble needs at least one teacher's logits")
    shapes = {tuple(t.shape) for t in members}
    if len(shapes) != 1:
        raise ValueError(f"teacher logits differ in shape: {sorted(shapes)}")
    if members[0].dim() != 2:
        raise ValueError(f"teacher logits must be (N, C) each; got shape {tuple(members[0].shape)}")
    return torch.stack([t.to(dtype) for t in members])


def mean_logits(logits: Sequence[torch.Tensor] | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(1/m) sum_i z_i (attention study Sec. 4.2), computed in ``dtype``."""
    return _stack(logits, dtype).mean(dim=0)


def mean_probs(logits: Sequence[torch.Tensor] | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log((1/m) sum_i softmax(z_i)) (fidelity study Sec. 3), computed in ``dtype``.

    Evaluated as ``logsumexp_i(log_softmax(z_i)) - log m``, so a class that every member gives a probability below
    the dtype's smallest number keeps a finite log-probability. The rows are normalised log-probabilities.
    """
    stacked = _stack(logits, dtype)
    return torch.logsumexp(torch.log_softmax(stacked, dim=-1), dim=0) - math.log(stacked.shape[0])


def ensemble_distribution(
    logits: Sequence[torch.Tensor] | torch.Tensor, mode: str = "mean_probs", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """One (N, C) logit tensor standing for the whole ensemble under a reduction of :data:`REDUCTIONS`.

    Config values are checked (as :class:`~hpckd.errors.ConfigError`) when the config loads; an unknown ``mode``
    reaching this function is a programming error, hence ``ValueError``.
    """
    if mode == "mean_probs":
        return mean_probs(logits, dtype)
    if mode == "mean_logits":
        return mean_logits(logits, dtype)
    raise ValueError(f"unknown ensemble reduction {mode!r}; choose one of {', '.join(REDUCTIONS)}")
