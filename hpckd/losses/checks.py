"""Input checks shared by every loss: shapes, class counts, finite values.

A loss is the first place where a teacher built for the wrong dataset (class-count mismatch) or a diverging
model (NaN/Inf logits) becomes visible, so the checks name the teacher and the batch (epoch and the first
offending global sample ids) and say how to fix it, in one line.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hpckd.data.batch import Batch
from hpckd.errors import ConfigError, UserError


class NonFiniteError(UserError):
    """Logits or a loss value contain NaN or Inf (a diverged model, a corrupt teacher or logit store)."""


def _batch_where(batch: Batch | None, bad: torch.Tensor | None = None) -> str:
    """Describe the batch (epoch, first global sample ids) for an error message."""
    if batch is None:
        return "this batch"
    epoch, index = batch.epoch, batch.index
    if bad is not None and bad.numel() == index.numel():
        ids = index.reshape(-1)[bad.reshape(-1).to(index.device)][:5].tolist()
        return f"batch of epoch {epoch}, sample ids {ids}"
    return f"batch of epoch {epoch}"


def check_logits(
    student: torch.Tensor, teachers: Sequence[torch.Tensor], batch: Batch | None = None, check_finite: bool = True
) -> None:
    """Raise a one-line error for malformed logits.

    Shapes are checked on the host; labels in range and (optionally) finite values cost one device sync
    in total, and only a failing batch pays for the detailed diagnosis.

    Args:
        student: (N, C) student logits.
        teachers: list of (N, C) teacher logits, one per teacher.
        batch: the :class:`~hpckd.data.batch.Batch` (for the error message and the label range).
        check_finite: also reject NaN/Inf.
    """
    _check_shapes(student, teachers)
    c = student.shape[1]
    labels = _class_labels(batch)
    flags = []
    if labels is not None:
        flags += [labels.max() >= c, labels.min() < 0]
    if check_finite:
        flags += [~torch.isfinite(x).all() for x in (student, *teachers)]
    if not flags or not bool(torch.stack([f.to(student.device) for f in flags]).any()):  # the one sync
        return
    if labels is not None:
        _check_label_range(labels, c, batch)
    _check_finite("student", student, batch)
    for k, t in enumerate(teachers):
        _check_finite(f"teacher {k}", t, batch)


def _check_shapes(student: torch.Tensor, teachers: Sequence[torch.Tensor]) -> None:
    if student.dim() != 2:
        raise ConfigError(f"student logits must be (batch, classes); got shape {tuple(student.shape)}")
    n, c = student.shape
    for k, t in enumerate(teachers):
        if t.dim() != 2 or t.shape[1] != c:
            raise ConfigError(
                f"teacher {k} gives {t.shape[-1]} classes but the student gives {c}: "
                f"use a teacher checkpoint trained on the same dataset (same num_classes)"
            )
        if t.shape[0] != n:
            raise ConfigError(f"teacher {k} gives logits for {t.shape[0]} samples but the student for {n}")


def _class_labels(batch: Batch | None) -> torch.Tensor | None:
    labels = None if batch is None else batch.labels
    if labels is None or labels.numel() == 0 or labels.dim() != 1 or labels.is_floating_point():
        return None
    return labels


def _check_label_range(labels: torch.Tensor, c: int, batch: Batch | None) -> None:
    bad = (labels >= c) | (labels < 0)
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ConfigError(
            f"label {first} out of range for a {c}-class student in {_batch_where(batch, bad)}: "
            f"set the model's num_classes to the dataset's class count"
        )


def _check_finite(who: str, logits: torch.Tensor, batch: Batch | None) -> None:
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        return
    bad = ~finite.all(dim=1)
    kind = "NaN" if bool(torch.isnan(logits).any()) else "Inf"
    # The fix depends on whose logits they are: a student that diverged needs another rate; a teacher that gives
    # NaN/Inf on real images is a broken checkpoint, which no rate of the student's run can mend.
    fix = ("the student diverged (lower optim.lr, or use optim.clip_grad_norm)" if who == "student"
           else f"{who}'s checkpoint is broken (it was saved diverged or corrupted); retrain or replace it")
    raise NonFiniteError(
        f"{who} logits contain {kind} for {int(bad.sum())} of {logits.shape[0]} samples in "
        f"{_batch_where(batch, bad)}: {fix}"
    )


def check_loss_finite(terms: dict[str, torch.Tensor], batch: Batch | None = None) -> None:
    """Raise :class:`NonFiniteError` naming the first non-finite term (the engine adds the step number)."""
    for name, value in terms.items():
        if not bool(torch.isfinite(value.detach()).all()):
            raise NonFiniteError(
                f"loss term '{name}' is {float(value.detach().float().sum())} in {_batch_where(batch)}"
            )
