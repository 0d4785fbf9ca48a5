"""Soft-target replacement and manipulation: the analysis tools of the response-based study (Sec. 4).

``soft_target_kd`` distils from the soft targets of teacher 0 (the weak teacher t-) after, on the samples of
``loss.targets.subset`` (all | correct | reg | reg_correct | not_correct, Fig. 4),

* ``loss.targets.replace`` = full | partial | confidence: replacing them by teacher 1's (the strong teacher t+;
  Sec. 4.1, Eqs. 1-2), or
* ``loss.targets.manipulate`` = label_smoothing (Eq. 3, t = ``loss.targets.smoothing``) | teacher_amplification
  (Eq. 4) | student_amplification (Eq. 5, delta = ``loss.targets.amplify_delta``).

The loss is ce_weight L_CE + kd_weight mean_n KD(y_n, z_s,n) with the tau^2-scaled KD of Sec. 3 against the
modified target y (:func:`hpckd.losses.functional.kd_from_probs`). The study distils with MEAL V2's setting,
lambda = 1, no CE (ce_weight = 0, kd_weight = 1; recipe ``response_analysis``). Subsets are decided on the
weak teacher at the teacher temperature and the student at ``tau``. Formulas: :mod:`hpckd.losses.targets`.
Terms: ``ce``, ``kd``, ``subset_frac`` (share of samples whose target was changed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpckd.config.methods import LossConfig
from hpckd.data.batch import Batch
from hpckd.errors import ConfigError
from hpckd.losses.base import Loss, register
from hpckd.losses.functional import kd_from_probs, masked_mean
from hpckd.losses.targets import REPLACEMENTS, amplification, label_smoothing_target, subset_mask


@register("soft_target_kd")
class SoftTargetKD(Loss):
    """KD from a weak teacher's soft targets, replaced or manipulated on a sample subset (Sec. 4, Eqs. 1-5)."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__(cfg)
        if cfg.targets.replace != "none" and cfg.targets.manipulate != "none":
            raise ConfigError(
                "loss.targets.replace and loss.targets.manipulate are both set: the study varies one at a time"
            )
        self.min_teachers = 2 if cfg.targets.replace != "none" else 1
        self.max_teachers = 2

    def targets(
        self, student: torch.Tensor, teachers: list[torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(modified targets (N, C), subset mask (N,)) at the teacher temperature."""
        cfg, rule = self.cfg, self.cfg.targets
        tau_t = cfg.teacher_tau or cfg.tau
        weak = teachers[0] / tau_t
        s_tempered = student.detach() / cfg.tau
        base = F.softmax(weak, dim=1)
        subset = subset_mask(rule.subset, weak, s_tempered, labels)
        if rule.replace != "none":
            changed = REPLACEMENTS[rule.replace](weak, teachers[1] / tau_t, labels)
        elif rule.manipulate == "label_smoothing":
            changed = label_smoothing_target(labels, student.shape[1], rule.smoothing, rule.smoothing_form, base.dtype)
        elif rule.manipulate == "teacher_amplification":
            changed = amplification(weak, labels, rule.amplify_delta)
        elif rule.manipulate == "student_amplification":
            changed = amplification(s_tempered, labels, rule.amplify_delta)
        else:
            return base, torch.zeros_like(subset)
        return torch.where(subset.unsqueeze(1), changed.to(base.dtype), base), subset

    def compute(self, student: torch.Tensor, teachers: list[torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        cfg, mask = self.cfg, self.mask(batch, student)
        target, subset = self.targets(student, teachers, batch.labels)
        kd = masked_mean(kd_from_probs(student, target, cfg.tau, cfg.kd_form), mask)
        ce = self.hard_label_term(student, batch, mask)
        return self.ce_kd_terms(ce, kd, subset_frac=masked_mean(subset.to(student.dtype), mask))
