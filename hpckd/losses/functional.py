"""Per-sample building blocks of the distillation losses (pure functions, no reduction).

Every function returns one value per sample, shape (N,), so that losses can mask padding samples
(``batch.valid``), split a doubled batch or weight samples (WSL) before reducing with :func:`masked_mean`.
Notation follows the papers: z_s / z_t student / teacher logits, sigma the softmax, tau the temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hard_ce(student_logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """L_NLL = -sum_c y_c log sigma_c(z_s) (attention study Eq. 6; fidelity study Sec. 3.1).

    ``label_smoothing`` eps replaces y by (1 - eps) y + eps / C (Szegedy et al. 2016), as the stage-1 CE of
    the response-based study's code (eps = 0.1).
    """
    return F.cross_entropy(student_logits, labels, reduction="none", label_smoothing=label_smoothing)


def mixed_hard_ce(student_logits: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """CE against the Mixup/CutMix target ``lam y_i + (1 - lam) y_j`` (Zhang et al. 2018, Eq. 1; Yun et al. 2019,
    Eq. 1). CE is linear in the target, so this is ``lam CE(y_i) + (1 - lam) CE(y_j)``, label smoothing included."""
    lam = lam.to(student_logits.dtype)
    own = hard_ce(student_logits, labels, label_smoothing)
    partner = hard_ce(student_logits, partner_labels, label_smoothing)
    return lam * own + (1.0 - lam) * partner


def soft_ce(student_logits: torch.Tensor, target_probs: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """-sum_c p_c log sigma_c(z_s / tau) for a target distribution ``target_probs`` (N, C)."""
    return -(target_probs * F.log_softmax(student_logits / tau, dim=1)).sum(dim=1)


def kd_from_probs(student_logits: torch.Tensor, target_probs: torch.Tensor, tau: float, form: str) -> torch.Tensor:
    """tau^2-scaled KD against an explicit target distribution (a teacher's, a replaced or manipulated one).

    ``cross_entropy``: -tau^2 sum_c p_c log sigma_c(z_s/tau) (attention study Eq. 7, response-based study
    Sec. 3 L_KD); ``kl``: tau^2 sum_c p_c (log p_c - log sigma_c(z_s/tau)) (augmentation study Eq. 1), with
    0 log 0 = 0. ``tau`` is the student's temperature; the target already carries the teacher's.
    """
    ce = soft_ce(student_logits, target_probs, tau)
    if form == "kl":
        ce = ce + torch.special.xlogy(target_probs, target_probs).sum(dim=1)
    elif form != "cross_entropy":
        raise ValueError(f"unknown kd_form {form!r}")
    return tau * tau * ce


def kd_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float, teacher_tau: float | None = None
) -> torch.Tensor:
    """L_KD = -tau^2 sum_c sigma_c(z_t/tau_t) log sigma_c(z_s/tau) with tau_t = tau unless given.

    Attention study Eq. 7; fidelity study Sec. 3.1; Hinton et al. 2015 Sec. 2 (tau^2 keeps the gradient
    magnitude independent of tau). With two temperatures (response-based study Sec. 5.2, stage 2: teacher
    0.7, student 1) the scale is the student's tau^2, as in that study's code.
    """
    p_t = F.softmax(teacher_logits / (teacher_tau or tau), dim=1)
    return tau * tau * soft_ce(student_logits, p_t, tau)


def kd_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float, teacher_tau: float | None = None
) -> torch.Tensor:
    """tau^2 KL(sigma(z_t/tau_t) || sigma(z_s/tau)) (augmentation study Eq. 1).

    Equals :func:`kd_cross_entropy` minus tau^2 times the teacher's tempered entropy, so the student's
    gradient is the same; the value is >= 0 and 0 when the tempered distributions match.
    """
    log_p_t = F.log_softmax(teacher_logits / (teacher_tau or tau), dim=1)
    log_p_s = F.log_softmax(student_logits / tau, dim=1)
    return tau * tau * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


def kd_term(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float, form: str, teacher_tau: float | None = None
) -> torch.Tensor:
    """The KD term in the configured form: ``cross_entropy`` (attention study Eq. 7) or ``kl``."""
    if form == "cross_entropy":
        return kd_cross_entropy(student_logits, teacher_logits, tau, teacher_tau)
    if form == "kl":
        return kd_kl(student_logits, teacher_logits, tau, teacher_tau)
    raise ValueError(f"unknown kd_form {form!r}")


def entropy(logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """H(sigma(z/tau)) = -sum_c p_c log p_c per sample (augmentation study Eq. 11)."""
    log_p = F.log_softmax(logits / tau, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def zscore(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z(z) = (z - mean(z)) / (std(z) + eps) over each sample's classes.

    Logit standardisation of Sun et al. 2024 (the attention study Sec. 6.2, Eqs. 10-11, and Table 2). The
    std is the sample std (n - 1), as in Sun et al.'s public code (``logit.std(dim=-1)``).
    """
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + eps)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (N,) over samples where ``mask`` is True; 0 (with grad) when none is."""
    if mask is None:
        return values.mean() if values.numel() else values.sum()
    mask = mask.to(device=values.device)
    kept = torch.where(mask, values, torch.zeros_like(values))
    return kept.sum() / mask.sum().clamp_min(1).to(values.dtype)
