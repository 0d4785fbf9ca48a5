"""The distillation step: one micro-batch in, named loss terms out.

:class:`DistillStep` is everything between the loader and ``backward``, in the order it happens::

    batch = apply_batch_ops(batch)            # Mixup / CutMix / CutMixPick / doubled batch / half split
    teacher_logits = teachers(batch)          # any TeacherSource: inline TeacherSet or a logit store
    student_logits = student(batch.views["student"])
    terms = loss(student_logits, teacher_logits, batch)   # {"loss": weighted total, "ce": ..., "kd": ...}

Teacher training (``hpckd train``) is the same step with no teachers and the CE loss. The epoch loop in
:mod:`hpckd.train.engine` calls the step, runs ``backward`` and the optimizer step, and checks the results on every
rank at its check points; it reads like torchvision's ``train_one_epoch``.

Host syncs: with ``deferred_checks`` (what the loop uses) only the first call checks its inputs on the host (the
loss's logit checks: one sync, with the detailed one-line error of a broken teacher or a wrong class count); every
later call leaves the loss and a non-finite flag on the device (:attr:`StepOutput.flags`), and the loop reads them
in one transfer per check point (:class:`FiniteWatch`), so a micro-step never waits for the device.

CutMixPick (without a half split) costs one teacher pass (or store read) over its pool and one over the original
rows of a doubled batch, k*B + B rows (k*B when x' replaces x): the kept rows' teacher logits are the pool's
(:meth:`pick_scores` hands each teacher's pool logits to the batch op, which keeps the kept rows' with the batch,
:class:`~hpckd.data.batch.KnownLogits`), gathered on the device, so the kept rows are never read on the host.

Randomness of the batch ops is keyed by (seed, epoch, sample ids) and the rows' global positions
(:class:`~hpckd.data.batchops.KeyedDraws`): a resumed run draws exactly what an uninterrupted one would, without
carrying RNG state, and a sample gets the same mix whatever the world size (when it divides
``batch_ops.mix_groups``), which lets a logit store written by W ranks serve a run on W' ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from hpckd.config import BatchOpsConfig
from hpckd.data.batch import STUDENT, Batch
from hpckd.data.batchops import KeyedDraws, apply_batch_ops, check_mix_groups, teacher_logits_after_ops
from hpckd.data.cutmixpick import needs_student
from hpckd.losses import Loss, NonFiniteError
from hpckd.losses.base import compute_dtype
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
    # deferred checks: (2,) fp32 on the device, [total loss, 1.0 if the student's logits hold NaN/Inf else 0.0]
    flags: torch.Tensor | None = None

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
    ``teachers`` is None for teacher training. ``deferred_checks``: see the module docstring (without it every
    call checks on the host and sets :attr:`StepOutput.problem`, one or two syncs per call).
    """

    def __init__(self, student: Forward, teachers: TeacherSource | None, loss: Loss, batch_ops: BatchOpsConfig,
                 data: DataStats, precision: PrecisionPolicy, seed: int, rank: int, world: int | None = None,
                 deferred_checks: bool = False) -> None:
        self.student, self.teachers, self.loss = student, teachers, loss
        self.deferred_checks = deferred_checks
        self._inputs_checked = False  # the first call always runs the loss's host-side input checks
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
        if self.deferred_checks and self._inputs_checked:
            # Loss.forward minus its input checks (their host sync): shapes, class count and teacher count were
            # checked on the first call and cannot change; finiteness is flagged on the device instead.
            terms = self.loss.compute(compute_dtype(student_logits),
                                      [compute_dtype(t).detach() for t in teacher_logits], batch)
            return StepOutput(terms, batch, "", student_logits.detach(), teacher_logits,
                              flags=finite_flags(terms["loss"], student_logits))
        self._inputs_checked = True
        try:
            terms = self.loss(student_logits, teacher_logits, batch)
        except NonFiniteError as exc:  # NaN/Inf logits, found by the loss's input check
            return StepOutput({}, batch, str(exc))
        total = terms["loss"].detach()
        problem = "" if bool(torch.isfinite(total).all()) else f"loss is {total.item()}"
        flags = finite_flags(terms["loss"], student_logits) if self.deferred_checks else None
        return StepOutput(terms, batch, problem, student_logits.detach(), teacher_logits, flags=flags)

    def teacher_logits(self, batch: Batch) -> list[torch.Tensor]:
        """The teachers' logits on a training batch (a logit store looks them up; inline teachers run), reusing
        the logits the batch ops already hold (CutMixPick's kept pool rows, ``batch.known_logits``)."""
        if self.teachers is None:
            return []
        with training_lookups(self.teachers):
            return teacher_logits_after_ops(batch, self.teachers)

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
    def pick_scores(self, pool: Batch) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor]]:
        """(teacher ensemble logits, student logits, each teacher's logits) on a CutMixPick pool; the student only
        when the criterion needs it (scored as trained: the student's forward carries its autocast). The
        per-teacher logits are the kept rows' teacher logits for the loss (no second pass; module docstring)."""
        logits = self.teacher_logits(pool)
        teacher = ensemble_distribution(logits) if logits else None
        student = None
        if needs_student(self.batch_ops):
            student = self.student(self.precision.student_input(pool.views[STUDENT])).float()
        return teacher, student, logits


def finite_flags(loss: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """(3,) fp32 on the loss's device: the total loss, whether the student's logits hold NaN/Inf (which says
    why the loss is not finite), and 0 (the slot :meth:`FiniteWatch.add_step` fills); a few kernels, no host sync."""
    student_bad = (~torch.isfinite(student_logits.detach())).any()
    zero = torch.zeros((), dtype=torch.float32, device=loss.device)
    return torch.stack([loss.detach().float().reshape(()), student_bad.float(), zero])


class FiniteWatch:
    """The finiteness flags of the micro-steps since the last check point, kept on the device.

    :meth:`add` queues one micro-step's :attr:`StepOutput.flags` and :meth:`add_step` the finite-step gate's flag
    of an optimizer step (:func:`hpckd.train.optim.finite_step_gate`: 1 when the step was skipped because its
    gradients held NaN/Inf although every loss was finite); neither syncs. :meth:`first_bad` reads them all in one
    device-to-host transfer and returns the first non-finite entry's ``(epoch, step, detail)`` (``step``: the
    1-based optimizer step it belonged to), or None, and starts a new window.
    """

    def __init__(self) -> None:
        self.flags: list[torch.Tensor] = []
        self.where: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self.flags)

    def add(self, flags: torch.Tensor, epoch: int, step: int) -> None:
        self.flags.append(flags)
        self.where.append((epoch, step))

    def add_step(self, skipped: torch.Tensor, epoch: int, step: int) -> None:
        zero = torch.zeros((), dtype=torch.float32, device=skipped.device)
        self.add(torch.stack([zero, zero, skipped.float().reshape(())]), epoch, step)

    def first_bad(self) -> Finding | None:
        if not self.flags:
            return None
        values = torch.stack(self.flags).tolist()  # the window's one device-to-host transfer (one sync)
        where, self.flags, self.where = self.where, [], []
        for (epoch, step), (loss, student_bad, skipped) in zip(where, values):
            if not math.isfinite(loss):
                detail = (f"loss is {loss}: the student's logits hold NaN/Inf (the student diverged: lower optim.lr, "
                          f"or use optim.clip_grad_norm)" if student_bad else f"loss is {loss}")
                return Finding(epoch, step, detail, loss=True)
            if skipped:
                return Finding(epoch, step, "the gradients hold NaN/Inf although the loss is finite (the step was "
                                            "skipped, the weights are those of the step before; lower optim.lr, or "
                                            "use optim.clip_grad_norm)", loss=False)
        return None


class Finding(NamedTuple):
    """The first non-finite entry of a check window: where, what, and whether it was a loss (else gradients
    only; under DDP a NaN loss on one rank makes every rank's averaged gradients NaN, so a loss wins a tie)."""

    epoch: int
    step: int
    detail: str
    loss: bool = True
