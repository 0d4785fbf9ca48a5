"""CutMixPick scoring and selection (the augmentation study, Sec. 4.2, Eq. 11).

CutMix is run k times on a batch (``loss.pick_pool``), giving a pool of k*B augmented samples; each pool
sample gets a score and a fraction r (``loss.pick_ratio``, 0.5 in the paper) is kept as the augmented half
of the doubled batch (:mod:`hpckd.losses.augmented`). Scores (``loss.pick_criterion``):

* ``teacher_entropy`` (default, Eq. 11): H(sigma(z_t)) = -p_t^T log p_t, at temperature 1 as in the code;
* ``student_entropy``: H(sigma(z_s)) (the alternative the paper finds weaker);
* ``kl``: KL(sigma(z_t/tau) || sigma(z_s/tau)) at the KD temperature (the code's ``kld`` criterion).

Which end is kept (``loss.pick_order``): the text says "sort ... in ascending order and keep the top r",
which reads as the lowest scores; the public code sorts ascending and keeps the *last* n, i.e. the
**highest** scores (the "pick large-entropy cutmix samples" comment). ``highest`` (default) follows the
code; ``lowest`` follows the literal text.

These are pure tensor functions: the batch op that builds the pool runs the teacher (and, for the student
criteria, the student under ``torch.no_grad``) on it, calls :func:`pick_indices`, and records the kept
indices in ``batch.aug``.
"""

from __future__ import annotations

import math

import torch

from hpckd.errors import ConfigError
from hpckd.losses.config import LossConfig
from hpckd.losses.functional import entropy, kd_kl


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
        return kd_kl(s, t, tau) / (tau * tau)  # plain KL: the tau^2 factor does not change the ranking
    raise ConfigError(f"unknown CutMixPick criterion {criterion!r}; choose teacher_entropy, student_entropy or kl")


def n_keep(pool_size: int, ratio: float) -> int:
    """Number of pool samples kept: round(r * P), at least 1."""
    return max(1, min(pool_size, math.floor(ratio * pool_size + 0.5)))


def pick_indices(scores: torch.Tensor, ratio: float, order: str = "highest") -> torch.Tensor:
    """Indices (into the pool) of the kept samples, best first.

    ``highest`` keeps the r*P largest scores (the study's code), ``lowest`` the r*P smallest (its text).
    Ties are broken by pool position (stable sort), so the choice is deterministic.
    """
    if order not in ("highest", "lowest"):
        raise ConfigError(f"unknown CutMixPick order {order!r}; choose highest or lowest")
    k = n_keep(scores.numel(), ratio)
    ranked = torch.sort(scores, descending=(order == "highest"), stable=True).indices
    return ranked[:k]


def select(teacher_logits: torch.Tensor | None, student_logits: torch.Tensor | None, cfg: LossConfig) -> torch.Tensor:
    """Pool indices to keep under the configured criterion, ratio and order."""
    return pick_indices(
        pick_scores(teacher_logits, student_logits, cfg.pick_criterion, cfg.tau), cfg.pick_ratio, cfg.pick_order
    )


def needs_student(cfg: LossConfig) -> bool:
    """Whether the pool must also go through the student (student_entropy, kl)."""
    return cfg.pick_criterion in ("student_entropy", "kl")


def _need(x: torch.Tensor | None, who: str, criterion: str) -> torch.Tensor:
    if x is None:
        raise ConfigError(f"CutMixPick criterion '{criterion}' needs the {who}'s logits on the pool")
    return x


__all__ = ["n_keep", "needs_student", "pick_indices", "pick_scores", "select"]
