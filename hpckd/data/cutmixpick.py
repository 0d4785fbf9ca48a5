"""CutMixPick scoring and selection (the augmentation study, Sec. 4.2, Eq. 11).

CutMix is run k times on a batch (``batch_ops.pick_pool``), giving a pool of k*B augmented samples; each pool
sample gets a score and a fraction r (``batch_ops.pick_ratio``, 0.5 in the paper) is kept as the augmented half
of the doubled batch (:func:`hpckd.data.batchops.apply_cutmix_pick`). Scores (``batch_ops.pick_criterion``):

* ``teacher_entropy`` (default, Eq. 11): H(sigma(z_t)) = -p_t^T log p_t, at temperature 1 as in the code;
* ``student_entropy``: H(sigma(z_s)) (the alternative the paper finds weaker);
* ``kl``: KL(sigma(z_t/tau) || sigma(z_s/tau)) at ``batch_ops.pick_tau`` (the code's ``kld`` criterion, at its
  KD temperature; before the config split this was ``loss.tau``).

Which end is kept (``batch_ops.pick_order``): the paper's reason for Eq. 11 is that "a sample with more
*information* is of higher quality", so the samples it keeps are the high-entropy ones; its procedure sentence
("sort ... in ascending order and keep the top r") agrees when "top" is the top of the sorted list, and the
public code does exactly that (sorts ascending, keeps the *last* n: "pick large-entropy cutmix samples").
``highest`` (default) is therefore the paper's definition and the code's; ``lowest`` is the other reading of
the procedure sentence (the first r after an ascending sort), kept as an option for ablations.

These are pure tensor functions: the batch op that builds the pool asks its scorer for the teacher's (and, for
the student criteria, the student's) logits on it, calls :func:`select`, and records the kept indices in
``batch.aug``. They read nothing back to the host (the kept indices stay on the scores' device; their number,
:func:`n_keep`, depends only on the pool size), which lets CutMixPick run without a per-step device sync.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hpckd.config.methods import BatchOpsConfig
from hpckd.errors import ConfigError

CRITERIA = ("teacher_entropy", "student_entropy", "kl")
ORDERS = ("highest", "lowest")
STUDENT_CRITERIA = ("student_entropy", "kl")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(sigma(z)) = -sum_c p_c log p_c per sample (augmentation study Eq. 11)."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(sigma(z_t/tau) || sigma(z_s/tau)) per sample (no tau^2 factor: it does not change the ranking)."""
    log_p_t = F.log_softmax(teacher_logits / tau, dim=1)
    log_p_s = F.log_softmax(student_logits / tau, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


@torch.no_grad()
def pick_scores(
    teacher_logits: torch.Tensor | None, student_logits: torch.Tensor | None, criterion: str, tau: float = 1.0
) -> torch.Tensor:
    """(P,) score of every pool sample for ``criterion`` (fp32)."""
    if criterion == "teacher_entropy":
        return entropy(_need(teacher_logits, "teacher", criterion).float())
    if criterion == "student_entropy":
        return entropy(_need(student_logits, "student", criterion).float())
    if criterion == "kl":
        t = _need(teacher_logits, "teacher", criterion).float()
        s = _need(student_logits, "student", criterion).float()
        return kl_divergence(t, s, tau)
    raise ConfigError(f"config: 'batch_ops.pick_criterion' is {criterion!r}; choose one of {', '.join(CRITERIA)}")


def n_keep(pool_size: int, ratio: float) -> int:
    """Number of pool samples kept: round(r * P), at least 1."""
    return max(1, min(pool_size, math.floor(ratio * pool_size + 0.5)))


def pick_indices(scores: torch.Tensor, ratio: float, order: str = "highest") -> torch.Tensor:
    """Indices (into the pool) of the kept samples, best first.

    ``highest`` keeps the r*P largest scores (the study's code), ``lowest`` the r*P smallest (its text).
    Ties are broken by pool position (stable sort), so the choice is deterministic.
    """
    if order not in ORDERS:
        raise ConfigError(f"config: 'batch_ops.pick_order' is {order!r}; choose highest or lowest")
    k = n_keep(scores.numel(), ratio)
    ranked = torch.sort(scores, descending=(order == "highest"), stable=True).indices
    return ranked[:k]


def select(teacher_logits: torch.Tensor | None, student_logits: torch.Tensor | None,
           cfg: BatchOpsConfig) -> torch.Tensor:
    """Pool indices to keep under the configured criterion, ratio and order."""
    scores = pick_scores(teacher_logits, student_logits, cfg.pick_criterion, cfg.pick_tau)
    return pick_indices(scores, cfg.pick_ratio, cfg.pick_order)


def needs_student(cfg: BatchOpsConfig) -> bool:
    """Whether the batch ops must also run the student on a CutMixPick pool (criteria student_entropy, kl)."""
    return cfg.scheme == "cutmix_pick" and cfg.pick_criterion in STUDENT_CRITERIA


def _need(x: torch.Tensor | None, who: str, criterion: str) -> torch.Tensor:
    if x is None:
        raise ConfigError(f"CutMixPick criterion '{criterion}' needs the {who}'s logits on the pool")
    return x


__all__ = ["CRITERIA", "ORDERS", "n_keep", "needs_student", "pick_indices", "pick_scores", "select"]
