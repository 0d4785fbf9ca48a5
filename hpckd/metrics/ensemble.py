"""Teacher-ensemble predictive distributions for metrics.

Two reductions appear in the reference studies:

- ``"mean_probs"`` (default): the ensemble model average, ``z_t = log(1/m * sum_i softmax(z_i))`` -- the fidelity
  study (Stanton et al. 2021, Sec. 3, "combined logits" of an m-component ensemble). It is the default because it
  is the predictive distribution of the ensemble itself (a proper mixture), so fidelity, calibration and
  agreement describe the model the student is asked to imitate; averaging logits is a product of experts whose
  confidence differs from every member's.
- ``"mean_logits"``: average the members' logits first, then softmax -- the attention study (Guo et al., Sec. 4.2:
  "the logits or outputs of different teachers are first averaged and then computed with the student").

Everything here returns float64 log-probabilities; ``log_softmax`` is idempotent on log-probabilities, so
downstream metrics accept either logits or log-probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

EnsembleMode = Literal["mean_probs", "mean_logits"]
ENSEMBLE_MODES: tuple[str, ...] = ("mean_probs", "mean_logits")


def as_logprobs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float64 ``log_softmax(logits / temperature)`` over the last dimension.

    float64 makes each row's result independent of batch composition and precise enough for exact sums.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = logits.double()
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def ensemble_logprobs(
    members: Sequence[torch.Tensor] | torch.Tensor, mode: EnsembleMode = "mean_probs"
) -> torch.Tensor:
    """Log-probabilities (float64, (N, C)) of a teacher ensemble from its members' logits.

    Args:
        members: a sequence of (N, C) logits, one per teacher, or a stacked (M, N, C) tensor.
        mode: ``"mean_probs"`` (log of the mean softmax; fidelity study Sec. 3) or ``"mean_logits"``
            (softmax of the mean logits; attention study Sec. 4.2).
    """
    stacked = members if isinstance(members, torch.Tensor) else torch.stack(list(members))
    if stacked.dim() != 3 or stacked.shape[0] == 0:
        raise ValueError(f"expected M >= 1 member logits of shape (N, C), got shape {tuple(stacked.shape)}")
    if mode == "mean_probs":
        # log(mean_i p_i) = logsumexp_i(log p_i) - log M, computed stably in log space.
        return torch.logsumexp(as_logprobs(stacked), dim=0) - math.log(stacked.shape[0])
    if mode == "mean_logits":
        return as_logprobs(stacked.double().mean(dim=0))
    raise ValueError(f"unknown ensemble mode {mode!r}; choose one of {ENSEMBLE_MODES}")
