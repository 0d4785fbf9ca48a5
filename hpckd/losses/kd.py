"""Cross-entropy, Hinton KD, ensemble KD and pure distillation.

* ``ce``: L = L_NLL (attention study Eq. 6). Needs no teacher.
* ``ensemble_kd``: L = ce_weight L_NLL + kd_weight (1/N) sum_k L_KDk (attention study Eqs. 6-8; with one
  teacher it is Hinton et al. 2015 KD). ``kd_form`` picks L_KDk = -tau^2 sum_c sigma_c(z_t/tau) log
  sigma_c(z_s/tau) (Eq. 7, ``cross_entropy``) or tau^2 KL(sigma(z_t/tau) || sigma(z_s/tau)) (``kl``, the
  augmentation study Eq. 1); both give the student the same gradient. ``ensemble`` picks how N teachers
  combine: ``per_teacher_loss`` (mean of the N KD terms, Eq. 8), or one KD term against the ensemble reduced by
  :func:`hpckd.teachers.ensemble.ensemble_distribution`: ``mean_probs`` (the log of the members' mean softmax, the
  fidelity study's ensemble) or ``mean_logits``.
* ``kd``: the same computation under Hinton's name; set ``alpha`` (hard-label weight, see
  :mod:`hpckd.losses.config`).
* ``pure_kd``: the fidelity study's pure distillation, L = L_KD (alpha = 0, Sec. 3.1 and 5); ``ce`` is still
  logged, unweighted, for comparison.

Value per recipe (:mod:`hpckd.losses.recipes`): attention study tau = 10, alpha = 0.2 (App. A.1); fidelity
study alpha = 0, tau = 4 (its strong baseline, Fig. 3), ensemble = mean_probs; augmentation study alpha = 0.1,
tau = 4, kd_form = kl.
Terms: ``ce``, ``kd`` and, for ``per_teacher_loss`` with several teachers, ``kd0``, ``kd1``, ...
"""

from __future__ import annotations

import torch

from hpckd.data.batch import Batch
from hpckd.losses.base import Loss, register
from hpckd.losses.functional import kd_term, masked_mean
from hpckd.teachers.ensemble import ensemble_distribution


@register("ce")
class CrossEntropy(Loss):
    """L = L_NLL = -sum_c y_c log sigma_c(z_s) (attention study Eq. 6); teachers, if given, are ignored."""

    min_teachers = 0

    def compute(self, student: torch.Tensor, teachers: list[torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        ce = self.hard_label_term(student, batch, self.mask(batch, student))
        return {"loss": ce, "ce": ce.detach()}


@register("ensemble_kd")
class EnsembleKD(Loss):
    """L = ce_weight L_NLL + kd_weight (1/N) sum_k L_KDk (attention study Eqs. 6-8)."""

    def kd_terms(
        self, student: torch.Tensor, teachers: list[torch.Tensor], mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """``kd`` (with grad) and, per teacher, ``kd{k}`` for the configured ensemble mode."""
        cfg = self.cfg
        if cfg.ensemble != "per_teacher_loss" and len(teachers) > 1:
            teachers = [ensemble_distribution(teachers, cfg.ensemble, dtype=teachers[0].dtype)]
        per_teacher = [masked_mean(kd_term(student, t, cfg.tau, cfg.kd_form, cfg.teacher_tau), mask) for t in teachers]
        terms = {"kd": torch.stack(per_teacher).mean()}
        if len(per_teacher) > 1:
            terms.update({f"kd{k}": v.detach() for k, v in enumerate(per_teacher)})
        return terms

    def compute(self, student: torch.Tensor, teachers: list[torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        mask = self.mask(batch, student)
        return self.ce_kd_terms(self.hard_label_term(student, batch, mask), **self.kd_terms(student, teachers, mask))


@register("kd")
class HintonKD(EnsembleKD):
    """Hinton et al. 2015: alpha L_NLL + (1 - alpha) tau^2 CE(sigma(z_t/tau), sigma(z_s/tau)) (fidelity study
    Sec. 3.1 notation). Several teachers are combined per ``ensemble``."""


@register("pure_kd")
class PureKD(EnsembleKD):
    """Pure distillation L = L_KD: no hard-label term whatever ce_weight says (fidelity study Sec. 3.1, alpha = 0)."""

    def compute(self, student: torch.Tensor, teachers: list[torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        mask = self.mask(batch, student)
        terms = self.kd_terms(student, teachers, mask)
        with torch.no_grad():
            ce = self.hard_label_term(student, batch, mask)
        return {"loss": self.cfg.kd_weight * terms["kd"], "ce": ce, **{k: v.detach() for k, v in terms.items()}}
