"""KD + DA with a doubled batch (the augmentation study, Sec. 4.1 and Fig. 3b).

Each original (crop+flip) sample x is kept and an augmented copy x' (Mixup, CutMix, CutMixPick, ...) is
appended, doubling the batch; the teacher sees x' too. For x the loss is the usual KD loss (Eq. 1); for x'
it is *only* the KL term: the labels that Mixup/CutMix assign are not used (Sec. 4.1, App. A.4):

    L = ce_weight CE(x) + kd_weight [ tau^2 KL_x + aug_kd_weight tau^2 KL_x' ]   (aug_kd_weight: loss.da),

each KL averaged over its own half, and the two half-means summed, as in the study's code
(``lw_mix = [1, 0, 1]``, ``-r 0.1 -a 0.9``: ce_weight 0.1, kd_weight 0.9, i.e. alpha = 0.1 here).

Marker contract: the batch op that doubles the batch sets ``batch.doubled``, a bool tensor (N,) that is
True for augmented-half samples; their ``labels`` entries are ignored by this loss (they must still be class
ids, e.g. the source sample's label, because every label is range-checked).
Terms: ``ce`` (original half), ``kd`` (original half), ``kd_aug`` (augmented half); per-teacher ``kd{k}`` /
``kd_aug{k}`` with several teachers (combined per ``loss.ensemble``).
"""

from __future__ import annotations

import torch

from hpckd.data.batch import Batch
from hpckd.errors import ConfigError
from hpckd.losses.base import and_masks, register, weighted_total
from hpckd.losses.kd import EnsembleKD

def augmented_half(batch: Batch, n: int, device: torch.device) -> torch.Tensor:
    """The (N,) bool marker of augmented-half samples, ``batch.doubled``; a clear error when absent."""
    if batch.doubled is None:
        raise ConfigError(
            "loss 'kd_da' needs a doubled batch (batch.doubled, set by batch_ops.scheme with batch_ops.doubled=true); "
            "use loss.name=kd for a plain batch"
        )
    marker = batch.doubled.to(device=device, dtype=torch.bool).reshape(-1)
    if marker.numel() != n:
        raise ConfigError(f"batch.doubled marks {marker.numel()} samples but the student gave {n} logits")
    return marker


@register("kd_da")
class DoubledBatchKD(EnsembleKD):
    """CE + KD on the original half, KL only on the augmented half (augmentation study Sec. 4.1)."""

    def compute(self, student: torch.Tensor, teachers: list[torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        valid = self.mask(batch, student)
        aug = augmented_half(batch, student.shape[0], student.device)
        orig_mask, aug_mask = and_masks(valid, ~aug), and_masks(valid, aug)
        orig = self.kd_terms(student, teachers, orig_mask)
        augd = self.kd_terms(student, teachers, aug_mask)
        ce = self.hard_label_term(student, batch, orig_mask)
        cfg = self.cfg
        total = weighted_total(
            [(cfg.ce_weight, ce), (cfg.kd_weight, orig["kd"]), (cfg.kd_weight * cfg.da.aug_kd_weight, augd["kd"])]
        )
        terms = {"loss": total, "ce": ce.detach()}
        terms.update({k: v.detach() for k, v in orig.items()})
        terms.update({k.replace("kd", "kd_aug", 1): v.detach() for k, v in augd.items()})
        return terms
