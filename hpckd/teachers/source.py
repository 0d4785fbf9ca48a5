"""The interface between teachers and the training loop.

Anything that turns a :class:`~hpckd.data.batch.Batch` into one fp32 (N, C) logit tensor per teacher, for this
rank's samples, can stand in for the teachers: :class:`~hpckd.teachers.serving.TeacherSet` computes them inline;
a logit store replays them by ``batch.index`` and the recorded augmentation parameters in ``batch.aug``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from hpckd.data.batch import Batch


@runtime_checkable
class TeacherSource(Protocol):
    num_classes: int

    def __len__(self) -> int:
        """Number of teachers."""
        ...

    def __call__(self, batch: Batch) -> list[torch.Tensor]:
        """One fp32 (batch.size, num_classes) tensor per teacher, without gradients."""
        ...

    def check_num_classes(self, num_classes: int) -> None:
        """Raise a one-line error when the teachers predict another number of classes than the data has."""
        ...

    @property
    def metas(self) -> list[dict[str, Any]]:
        """Per-teacher metadata (augmentation policy, dataset fingerprint, val accuracy, ...)."""
        ...
