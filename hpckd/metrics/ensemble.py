"""Log-probabilities for metrics: one model's (:func:`as_logprobs`) or a teacher ensemble's (:func:`ensemble_logprobs`).

The ensemble reductions (``metrics.ensemble``: ``mean_probs``, the default, or ``mean_logits``) are computed by
:mod:`hpckd.teachers.ensemble`, the one implementation shared with the loss; its docstring gives the formulas and
why metrics default to ``mean_probs``. Metrics compute them in float64.

Everything here returns float64 log-probabilities; ``log_softmax`` is idempotent on log-probabilities, so
downstream metrics accept either logits or log-probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hpckd.teachers.ensemble import ensemble_distribution


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


def ensemble_logprobs(members: Sequence[torch.Tensor] | torch.Tensor, mode: str = "mean_probs") -> torch.Tensor:
    """Log-probabilities (float64, (N, C)) of a teacher ensemble from its members' logits.

    Args:
        members: a sequence of (N, C) logits, one per teacher, or a stacked (M, N, C) tensor.
        mode: ``"mean_probs"`` (log of the mean softmax; fidelity study Sec. 3) or ``"mean_logits"``
            (softmax of the mean logits; attention study Sec. 4.2). Anything else raises ``ValueError``.
    """
    return as_logprobs(ensemble_distribution(members, mode, dtype=torch.float64))
