"""Efficient Distillation of the response-based study (Sec. 5): the WSL loss and consistent knowledge mining.

``wsl`` — Weighted Soft Labels (Zhou et al. 2021, the study's [53]; stage 1 of Efficient Distillation):
each sample's KD term is weighted by w = 1 - exp(-CE_s / CE_t), with CE_s = -log sigma_k(z_s) and
CE_t = -log sigma_k(z_t) on the labelled class k (detached; negative ratios clipped to 0). Samples where the
student already beats the teacher (CE_s << CE_t, "regularisation samples") get small weights:

    L = ce_weight CE_ls(z_s, y) + kd_weight mean_n w_n L_KD,n.

``loss.wsl.weight_tau`` picks the temperature of the two CEs: ``tau`` (EffDstl's code: sigma(z/tau)) or ``one``
(the WSL authors' code: sigma(z), with CE_t + 1e-7). Stage-1 recipe: tau = 2, ce_weight = 1 with label
smoothing 0.1, kd_weight = 0.5 (EffDstl configs); the WSL paper's own is ce 1, kd 2.5, tau 2.

``ckm`` — consistent knowledge mining (Sec. 5.1; stage 2): for a sample whose teacher is correct
(argmax z_t = k) but less confident than the student on k (y^t_k < y^s_k), the teacher's soft target is
replaced by a label-smoothed target with confidence t = 0.99 (Eq. 3: ``loss.targets.smoothing`` and
``loss.targets.smoothing_form``, shared with ``soft_target_kd``'s label_smoothing); other samples are distilled
unchanged:

    L_n = CE(LS_t(y), sigma(z_s))                      if mined,
          -tau^2 sum_c sigma_c(z_t/tau_t) log sigma_c(z_s/tau)   otherwise.

Stage-2 recipe: teacher tau_t = 0.7 (``teacher_tau``), student tau = 1, ce_weight = 0, kd_weight = 1, with a
stronger teacher of the same architecture (:func:`hpckd.losses.recipes.efficient_distillation_stages`).
Terms: ``ce``, ``kd`` (the weighted/mined distillation term) and ``wsl_weight`` / ``mined_frac``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpckd.data.batch import Batch
from hpckd.losses.base import Loss, register
from hpckd.losses.functional import kd_term, masked_mean
from hpckd.losses.targets import label_prob, label_smoothing_target


def wsl_weight(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    tau_s: float,
    tau_t: float,
    eps: float = 0.0,
) -> torch.Tensor:
    """w = 1 - exp(-max(CE_s / (CE_t + eps), 0)) per sample, detached (Zhou et al. 2021, Eq. 9)."""
    with torch.no_grad():
        ce_s = F.cross_entropy(student_logits / tau_s, labels, reduction="none")
        ce_t = F.cross_entropy(teacher_logits / tau_t, labels, reduction="none")
        ratio = (ce_s / (ce_t + eps)).nan_to_num(nan=0.0, posinf=float("inf")).clamp_min(0.0)
        return 1.0 - torch.exp(-ratio)


@register("wsl")
class WeightedSoftLabels(Loss):
    """ce_weight CE + kd_weight mean(w * L_KD), w = 1 - exp(-CE_s/CE_t) (response-based study Sec. 5.2, [53])."""

    max_teachers = 1

    def compute(self, student: torch.Tensor, teachers: list[torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        cfg, teacher, mask = self.cfg, teachers[0], self.mask(batch, student)
        tau_t = cfg.teacher_tau or cfg.tau
        if cfg.wsl.weight_tau == "tau":
            w = wsl_weight(student, teacher, batch.labels, cfg.tau, tau_t)
        else:
            w = wsl_weight(student, teacher, batch.labels, 1.0, 1.0, eps=1e-7)
        kd = masked_mean(w * kd_term(student, teacher, cfg.tau, cfg.kd_form, cfg.teacher_tau), mask)
        return self.ce_kd_terms(self.hard_label_term(student, batch, mask), kd, wsl_weight=masked_mean(w, mask))


def mined_mask(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, tau_s: float, tau_t: float
) -> torch.Tensor:
    """Consistent-knowledge-mining samples: teacher correct and y^t_k < y^s_k (Sec. 5.1)."""
    with torch.no_grad():
        correct = teacher_logits.argmax(dim=1) == labels
        p_s = label_prob(F.softmax(student_logits / tau_s, dim=1), labels)
        p_t = label_prob(F.softmax(teacher_logits / tau_t, dim=1), labels)
        return correct & (p_t < p_s)


@register("ckm")
class ConsistentKnowledgeMining(Loss):
    """KD with label-smoothed targets (t = 0.99) on correct-but-under-confident teacher samples (Sec. 5.1)."""

    max_teachers = 1

    def compute(self, student: torch.Tensor, teachers: list[torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        cfg, teacher, labels, mask = self.cfg, teachers[0], batch.labels, self.mask(batch, student)
        tau_t = cfg.teacher_tau or cfg.tau
        mined = mined_mask(student, teacher, labels, cfg.tau, tau_t)
        smoothed = label_smoothing_target(labels, student.shape[1], cfg.targets.smoothing, cfg.targets.smoothing_form,
                                          student.dtype)
        label_term = -(smoothed * F.log_softmax(student, dim=1)).sum(dim=1)
        kd_per_sample = kd_term(student, teacher, cfg.tau, cfg.kd_form, cfg.teacher_tau)
        kd = masked_mean(torch.where(mined, label_term, kd_per_sample), mask)
        ce = self.hard_label_term(student, batch, mask)
        return self.ce_kd_terms(ce, kd, mined_frac=masked_mean(mined.to(student.dtype), mask))
