"""Logit-standardised KD (Sun et al. 2024, "Logit Standardization in Knowledge Distillation").

The attention study (Sec. 6.2, Eqs. 10-11; Table 2) compares vanilla KD with this method: a student that
matches the teacher's softmax perfectly can still differ by a shift (Eq. 10) and a variance ratio (Eq. 11),
so both logit vectors are z-scored per sample before the tempered softmax:

    L_KD = tau^2 KL(sigma(Z(z_t)/tau) || sigma(Z(z_s)/tau)),   Z(z) = (z - mean(z)) / std(z),

with tau the *base* temperature (Sun et al. use 2; the z-score makes the effective temperature adapt to each
sample's logit spread). The loss is invariant to shifting and (positively) scaling either logit vector.
Total: ce_weight L_NLL + kd_weight mean_k L_KDk. ``kd_form`` cross_entropy adds the (constant) teacher entropy.
"""

from __future__ import annotations

import torch

from hpckd.data.batch import Batch
from hpckd.losses.base import register
from hpckd.losses.functional import zscore
from hpckd.losses.kd import EnsembleKD


@register("standardized_kd")
class StandardizedKD(EnsembleKD):
    """Ensemble KD on z-scored logits (Sun et al. 2024; attention study Sec. 6.2)."""

    def compute(self, student: torch.Tensor, teachers: list[torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        mask = self.mask(batch, student)
        terms = self.kd_terms(zscore(student), [zscore(t) for t in teachers], mask)
        return self.ce_kd_terms(self.hard_label_term(student, batch, mask), **terms)
