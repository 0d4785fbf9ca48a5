"""Fidelity of a student to its teacher: top-1 agreement and predictive KL.

Fidelity study (Stanton et al. 2021, Sec. 3.2), Eq. 2 and Eq. 3:

    Average Top-1 Agreement = 1/n sum_i 1{argmax_j p_t(j|x_i) = argmax_j p_s(j|x_i)}
    Average Predictive KL   = 1/n sum_i KL(p_t(y|x_i) || p_s(y|x_i))

(the attention study's Eq. 2 and Eq. 3 are the same formulas). The attention study's public code instead reports
``KL(p_s || p_t)`` multiplied by 10; ``direction="student_teacher", scale=10`` reproduces that. Teacher inputs are
logits or log-probabilities of one model or of an ensemble (see :func:`hpckd.metrics.ensemble.ensemble_logprobs`).
"""

from __future__ import annotations

from typing import Literal

import torch

from hpckd.metrics.classification import Reduction
from hpckd.metrics.ensemble import as_logprobs

KLDirection = Literal["teacher_student", "student_teacher"]
KL_DIRECTIONS: tuple[str, ...] = ("teacher_student", "student_teacher")


def _check_same(teacher: torch.Tensor, student: torch.Tensor) -> None:
    if teacher.shape != student.shape or teacher.dim() != 2:
        raise ValueError(
            f"teacher and student outputs must both be (N, C), got {tuple(teacher.shape)} and {tuple(student.shape)}"
        )


def agreement_mask(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """(N,) bool: teacher and student give the same top-1 class (fidelity study Eq. 2)."""
    _check_same(teacher_logits, student_logits)
    return teacher_logits.argmax(dim=-1) == student_logits.argmax(dim=-1)


def top1_agreement(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Average top-1 agreement in [0, 1] (fidelity study Eq. 2; attention study Eq. 3, "Top-1 A")."""
    return float(agreement_mask(teacher_logits, student_logits).double().mean())


def kl_per_sample(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    direction: KLDirection = "teacher_student",
    temperature: float = 1.0,
) -> torch.Tensor:
    """(N,) float64 ``KL(p_t || p_s)`` (or ``KL(p_s || p_t)``) in nats, with both softmaxes at ``temperature``."""
    _check_same(teacher_logits, student_logits)
    log_t = as_logprobs(teacher_logits, temperature)
    log_s = as_logprobs(student_logits, temperature)
    if direction == "teacher_student":
        log_p, log_q = log_t, log_s
    elif direction == "student_teacher":
        log_p, log_q = log_s, log_t
    else:
        raise ValueError(f"unknown KL direction {direction!r}; choose one of {KL_DIRECTIONS}")
    # Terms with p = 0 contribute 0 (lim p log p/q), even where log q = -inf.
    terms = torch.where(torch.isneginf(log_p), torch.zeros_like(log_p), log_p.exp() * (log_p - log_q))
    return terms.sum(dim=-1)


def predictive_kl(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    direction: KLDirection = "teacher_student",
    temperature: float = 1.0,
    scale: float = 1.0,
    reduction: Reduction = "mean",
) -> torch.Tensor | float:
    """Average predictive KL (fidelity study Eq. 3): ``scale * mean_i KL(p_t(.|x_i) || p_s(.|x_i))`` at tau = 1.

    ``direction="student_teacher", scale=10.0`` gives the attention study's public-code variant.
    """
    per_sample = scale * kl_per_sample(teacher_logits, student_logits, direction, temperature)
    return per_sample if reduction == "none" else float(per_sample.mean())


def independent_student_baseline(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    independent_student_logits: torch.Tensor,
) -> dict[str, float]:
    """Fidelity of a student versus a student distilled (identically) from an *independent* teacher.

    Fidelity study Sec. 3.2: comparing (t, s) with (t, s') separates a generic gain in generalisation from a gain
    in fidelity; if both agree with t about equally, s agrees with t because it generalises well. Returns the
    agreement and KL of both students with the original teacher and their differences (student - independent).
    """
    agree = top1_agreement(teacher_logits, student_logits)
    agree_ind = top1_agreement(teacher_logits, independent_student_logits)
    kl = float(predictive_kl(teacher_logits, student_logits))
    kl_ind = float(predictive_kl(teacher_logits, independent_student_logits))
    return {
        "top1_agreement": agree,
        "independent_top1_agreement": agree_ind,
        "top1_agreement_excess": agree - agree_ind,
        "predictive_kl": kl,
        "independent_predictive_kl": kl_ind,
        "predictive_kl_excess": kl - kl_ind,
    }
