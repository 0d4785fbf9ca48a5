"""Generalisation metrics of a single model: top-k accuracy, NLL, predictive entropy, train-val gap.

References: the fidelity study (Stanton et al. 2021, Sec. 3.2) reports top-1 accuracy and NLL; the attention
study (Guo et al., Eq. 12) the predictive entropy and the train-val accuracy gap ("Acc-Gap", Sec. 8).
"""

from __future__ import annotations

from typing import Literal

import torch

from hpckd.metrics.ensemble import as_logprobs

Reduction = Literal["mean", "none"]


def _check_pair(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> torch.Tensor:
    """(N,) bool: the label is among the ``k`` highest logits (ties broken by ``torch.topk``)."""
    _check_pair(logits, labels)
    if k == 1:
        return logits.argmax(dim=-1) == labels
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy in [0, 1]: fraction of samples whose label is among the k highest logits."""
    return float(topk_correct(logits, labels, k).double().mean())


def nll(logits: torch.Tensor, labels: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor | float:
    """Negative log-likelihood ``-log softmax(z)_y`` in nats (fidelity study Sec. 3.2); logits or log-probs."""
    _check_pair(logits, labels)
    per_sample = -as_logprobs(logits).gather(1, labels[:, None].long()).squeeze(1)
    return per_sample if reduction == "none" else float(per_sample.mean())


def entropy(logits: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor | float:
    """Predictive entropy ``H(x) = -sum_c p_c log p_c`` in nats (attention study Eq. 12); logits or log-probs."""
    logp = as_logprobs(logits)
    # p log p -> 0 as p -> 0; exp(logp) * logp is exactly 0 where exp underflows, except at -inf (0 * -inf).
    per_sample = -torch.where(torch.isneginf(logp), torch.zeros_like(logp), logp.exp() * logp).sum(dim=-1)
    return per_sample if reduction == "none" else float(per_sample.mean())


def train_val_gap(train_accuracy: float, val_accuracy: float) -> float:
    """Train-val accuracy gap ``Acc(train) - Acc(val)`` (attention study Sec. 8, "Acc-Gap"; larger = more overfit)."""
    return float(train_accuracy) - float(val_accuracy)
