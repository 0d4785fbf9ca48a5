"""Training accuracy, top-1 agreement with the teachers and Acc-Gap from the training forward passes (the attention
study's "during training" metrics, Tables 3-4 and A.1-A.3): counts per micro-step, summed over ranks per epoch."""

from __future__ import annotations

import torch

from hpckd.metrics.exact import all_reduce_int64
from hpckd.teachers.ensemble import ensemble_distribution
from hpckd.train.step import StepOutput


def train_counts(out: StepOutput, ensemble: str = "mean_probs") -> dict[str, torch.Tensor]:
    """This rank's counts from one training forward pass (cheap: the logits exist anyway): rows, rows whose top-1
    class is the label, and rows whose top-1 class is the teacher ensemble's (``metrics.ensemble``). The x' rows
    of a doubled batch are left out (their originals count); Mixup/CutMix rows count against their own label.
    The counts stay on the device (no host sync per step); :func:`train_metrics` reads them once per epoch."""
    if out.student_logits is None:
        return {}
    batch = out.batch
    keep = torch.ones(batch.size, dtype=torch.bool, device=out.student_logits.device)
    if batch.doubled is not None:
        keep &= ~batch.doubled.to(keep.device)
    if batch.valid is not None:
        keep &= batch.valid.to(keep.device).bool()
    pred = out.student_logits.argmax(dim=-1)
    values = [keep.sum(), ((pred == batch.labels.to(pred.device)) & keep).sum()]
    if out.teacher_logits:
        teacher = ensemble_distribution(list(out.teacher_logits), ensemble).argmax(dim=-1).to(pred.device)
        values.append(((pred == teacher) & keep).sum())
    return dict(zip(("rows", "correct", "agree"), values))


def train_metrics(counts: dict[str, torch.Tensor | int], val_accuracy: float | None) -> dict[str, float]:
    """The epoch's training accuracy and top-1 agreement with the teachers on the distillation data (attention
    study Tables 3-4 and A.1-A.3, "during training"), summed over ranks (a collective), and the Acc-Gap
    ``train_accuracy - val_accuracy`` (Table 3). Training accuracy comes from the training forward passes (train
    mode, augmented inputs, weights changing during the epoch); ``hpckd eval --split train`` gives the exact
    post-hoc value."""
    names = ("rows", "correct", "agree")
    local = {k: torch.tensor(int(counts.get(k, 0)), dtype=torch.int64) for k in names}  # the epoch's one host read
    total = {k: int(v) for k, v in all_reduce_int64(local).items()}
    if total["rows"] == 0:
        return {}
    out = {"train_accuracy": total["correct"] / total["rows"]}
    if "agree" in counts or total["agree"]:
        out["train_top1_agreement"] = total["agree"] / total["rows"]
    if val_accuracy is not None:
        out["acc_gap"] = out["train_accuracy"] - float(val_accuracy)
    return out
