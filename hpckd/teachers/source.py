"""The interface between teachers and the training loop / evaluation.

Anything that turns a :class:`~hpckd.data.batch.Batch` into one fp32 (N, C) logit tensor per teacher, for this
rank's samples, can stand in for the teachers: :class:`~hpckd.teachers.serving.TeacherSet` computes them inline;
a logit store replays them by ``batch.index`` and the recorded augmentation parameters in ``batch.aug``.

Class activation maps are a capability: a source that runs CNN teachers answers ``has_cam_features(k)`` with True
and gives the ingredients of teacher k's CAM; a source without models (a logit store) answers False, and the
evaluation then skips teacher CAM-IoU. ViT attention maps are a second, optional capability
(:class:`AttentionSource`): a source that runs ViT teachers gives their per-block attention probabilities.
A source that runs its teachers can give their logits and their maps from one forward each
(:class:`OnePassCamSource`, :class:`OnePassMapSource`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
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

    def has_cam_features(self, index: int) -> bool:
        """Whether :meth:`cam_features` works for teacher ``index`` on this rank."""
        ...

    def cam_features(self, batch: Batch, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Teacher ``index``'s last conv features (N, K, h, w), head weight (C, K) and bias, fp32, on its view."""
        ...


@runtime_checkable
class OnePassCamSource(Protocol):
    """Optional capability of a teacher source that runs CNN teachers: the logits of every teacher and the CAM
    ingredients of some, from one forward pass per teacher (the evaluation's teacher CAM-IoU needs both)."""

    def logits_and_cams(self, batch: Batch, indices: Sequence[int]) -> tuple[
            list[torch.Tensor], dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]]:
        """(what ``source(batch)`` gives, {k: what ``cam_features(batch, k)`` gives for k in ``indices``})."""
        ...


@runtime_checkable
class OnePassMapSource(Protocol):
    """Optional capability of a teacher source that runs CNN and/or ViT teachers: the logits of every teacher, the
    CAM ingredients of some and the attention maps of others, from one forward pass per teacher (the evaluation's
    teacher IoU needs the maps and the logits of the same teachers)."""

    def logits_and_maps(self, batch: Batch, cams: Sequence[int] = (), attentions: Sequence[int] = ()) -> tuple[
            list[torch.Tensor], dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
            dict[int, list[torch.Tensor]]]:
        """(what ``source(batch)`` gives, {k: ``cam_features(batch, k)`` for k in ``cams``},
        {k: ``attention_maps(batch, k)`` for k in ``attentions``})."""
        ...


@runtime_checkable
class AttentionSource(Protocol):
    """Optional capability of a teacher source: ViT attention maps (attention study App. A.7)."""

    def has_attention_maps(self, index: int) -> bool:
        """Whether :meth:`attention_maps` works for teacher ``index`` on this rank (a ViT run here)."""
        ...

    def attention_maps(self, batch: Batch, index: int) -> list[torch.Tensor]:
        """Teacher ``index``'s per-block attention probabilities (N, heads, T, T), fp32, on the view it reads."""
        ...


def training_lookups(source: object) -> contextlib.AbstractContextManager:
    """The context the training step calls its teachers in: a logit store serves training batches from disk only
    inside it (everything else, e.g. evaluation, runs the teachers); inline sources ignore it."""
    training = getattr(source, "training", None)
    return training() if callable(training) else contextlib.nullcontext()
