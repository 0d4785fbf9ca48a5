"""The distillation step: one micro-batch in, named loss terms out.

:class:`DistillStep` is everything between the loader and ``backward``, in the order it happens::

    batch = apply_batch_ops(batch)            # Mixup / CutMix / CutMixPick / doubled batch / half split
    teacher_logits = teachers(batch)          # any TeacherSource: inline TeacherSet today, a logit store tomorrow
    student_logits = student(batch.views["student"])
    terms = loss(student_logits, teacher_logits, batch)   # {"loss": weighted total, "ce": ..., "kd": ...}

Teacher training (``hpckd train``) is the same step with no teachers and the CE loss. The epoch loop in
:mod:`hpckd.train.engine` calls the step, checks the result on every rank, and runs ``backward`` and the optimizer
step; it reads like torchvision's ``train_one_epoch``.

Randomness of the batch ops is keyed by (seed, epoch, sample ids) and the rows' global positions
(:class:`~hpckd.data.batchops.KeyedDraws`): a resumed run draws exactly what an uninterrupted one would, without
carrying RNG state, and a sample gets the same mix whatever the world size (when it divides
``batch_ops.mix_groups``), which lets a logit store written by W ranks serve a run on W' ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hpckd.config import BatchOpsConfig
from hpckd.data.batch import STUDENT, Batch
from hpckd.data.batchops import KeyedDraws, apply_batch_ops, check_mix_groups
from hpckd.data.cutmixpick import needs_student
from hpckd.losses import Loss, NonFiniteError
from hpckd.precision import PrecisionPolicy
from hpckd.teachers.ensemble import ensemble_distribution
from hpckd.teachers.source import TeacherSource, training_lookups

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class StepOutput:
    """What one micro-batch gave: the loss terms (``"loss"`` carries the graph) and, if the loss is not finite,
    why (empty string otherwise)."""

    terms: dict[str, torch.Tensor]
    batch: Batch
    problem: str = ""
    student_logits: torch.Tensor | None = None  # detached, for the epoch's training accuracy / agreement
    teacher_logits: Sequence[torch.Tensor] = ()

    @property
    def loss(self) -> torch.Tensor:
        return self.terms["loss"]


@dataclass
class DataStats:
    """What the batch ops need to know about the images: the policy family and the loader's normalisation."""

    family: str
    mean: Sequence[float]
    std: Sequence[float]


class DistillStep:
    """Batch -> :class:`StepOutput` for one micro-batch (see the module docstring).

    ``student`` is the training forward of the backend (autocast and DDP/DeepSpeed wrapping inside);
    ``teachers`` is None for teacher training.
    """

    def __init__(self, student: Forward, teachers: TeacherSource | None, loss: Loss, batch_ops: BatchOpsConfig,
                 data: DataStats, precision: PrecisionPolicy, seed: int, rank: int, world: int | None = None) -> None:
        self.student, self.teachers, self.loss = student, teachers, loss
        self.batch_ops, self.data, self.precision = batch_ops, data, precision
        if world is None:  # the default process group's size, as the loaders see it
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.seed, self.rank, self.world = seed, rank, int(world)
        if self.has_batch_ops:
            check_mix_groups(int(batch_ops.mix_groups), self.world)

    def __call__(self, batch: Batch, epoch: int, epoch_step: int) -> StepOutput:
        batch = self.apply_batch_ops(batch, epoch, epoch_step)
        teacher_logits = self.teacher_logits(batch)
        student_logits = self.student(self.precision.student_input(batch.views[STUDENT])).float()
        try:
            terms = self.loss(student_logits, teacher_logits, batch)
        except NonFiniteError as exc:  # NaN/Inf logits, found by the loss's input check
            return StepOutput({}, batch, str(exc))
        total = terms["loss"].detach()
        problem = "" if bool(torch.isfinite(total).all()) else f"loss is {total.item()}"
        return StepOutput(terms, batch, problem, student_logits.detach(), teacher_logits)

    def teacher_logits(self, batch: Batch) -> list[torch.Tensor]:
        """The teachers' logits on a training batch (a logit store looks them up; inline teachers run)."""
        if self.teachers is None:
            return []
        with training_lookups(self.teachers):
            return self.teachers(batch)

    # ------------------------------------------------------------------------------------------ batch ops
    @property
    def has_batch_ops(self) -> bool:
        return self.batch_ops.scheme != "none" or self.batch_ops.half_split != "none"

    def apply_batch_ops(self, batch: Batch, epoch: int, epoch_step: int) -> Batch:
        if not self.has_batch_ops:
            return batch
        # Keyed by the data epoch the loader produced (batch.epoch: the same as ``epoch`` unless a logit store
        # cycles its epochs) and the samples' ids and positions; epoch_step is not part of the key.
        draws = KeyedDraws(self.seed, batch.epoch, self.rank, self.world, int(self.batch_ops.mix_groups))
        return apply_batch_ops(batch, self.batch_ops, draws, family=self.data.family, mean=self.data.mean,
                               std=self.data.std, scorer=self.pick_scores)

    @torch.no_grad()
    def pick_scores(self, pool: Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(teacher ensemble logits, student logits) on a CutMixPick pool; the student only when the criterion
        needs it (scored as trained: the student's forward carries its autocast)."""
        teacher = ensemble_distribution(self.teacher_logits(pool)) if self.teachers is not None else None
        student = None
        if needs_student(self.batch_ops):
            student = self.student(self.precision.student_input(pool.views[STUDENT])).float()
        return teacher, student
