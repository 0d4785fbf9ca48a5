"""The :class:`Loss` interface every distillation method implements.

``terms = loss(student_logits, teacher_logits, batch)`` returns a dict of scalar tensors: ``terms["loss"]`` is
the weighted total that is back-propagated, every other key is a named, *unweighted*, detached term that
the engine logs (``ce``, ``kd``, per-teacher ``kd0``, ``kd1``, ...). Inputs may be bf16/fp16: losses compute
in fp32 (fp64 inputs stay fp64, for gradient checks). Teacher logits are constants (detached): teachers are
frozen in every study. Padding samples (``batch.valid`` False) never contribute. Means are per rank (over its
valid samples); DDP then averages gradients over ranks, which equals the global mean whenever ranks hold
equally many valid samples (all but a padded last batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from hpckd.config.methods import LossConfig
from hpckd.data.batch import Batch
from hpckd.errors import ConfigError
from hpckd.losses.checks import check_logits
from hpckd.losses.functional import hard_ce, masked_mean, mixed_hard_ce


class Loss(nn.Module):
    """Base class: checks and up-casts the inputs, then calls :meth:`compute`.

    Subclasses are registered with :func:`register` (which sets ``name``) and set ``min_teachers`` /
    ``max_teachers``.
    """

    name: str = "?"
    min_teachers: int = 1
    max_teachers: int | None = None

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor], batch: Batch
    ) -> dict[str, torch.Tensor]:
        teachers = list(teacher_logits)
        self._check_teacher_count(len(teachers))
        check_logits(student_logits, teachers, batch, check_finite=self.cfg.check_finite)
        return self.compute(compute_dtype(student_logits), [compute_dtype(t).detach() for t in teachers], batch)

    def compute(self, student: torch.Tensor, teachers: list[torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _check_teacher_count(self, n: int) -> None:
        if n < self.min_teachers:
            raise ConfigError(
                f"loss '{self.name}' needs at least {self.min_teachers} teacher(s) but got {n}: "
                f"add entries under 'teachers:' or use loss.name=ce"
            )
        if self.max_teachers is not None and n > self.max_teachers:
            raise ConfigError(f"loss '{self.name}' takes at most {self.max_teachers} teacher(s) but got {n}")

    def mask(self, batch: Batch, student: torch.Tensor) -> torch.Tensor | None:
        return valid_mask(batch, student.shape[0], student.device)

    def hard_label_term(self, student: torch.Tensor, batch: Batch, mask: torch.Tensor | None) -> torch.Tensor:
        """Mean L_NLL over the kept samples (with the configured label smoothing); on rows mixed by Mixup/CutMix
        the mixed target's CE when ``mixed_labels`` (``batch.label_mix``, set by :mod:`hpckd.data.batchops`)."""
        mix = batch.label_mix if self.cfg.mixed_labels else None
        if mix is None:
            return masked_mean(hard_ce(student, batch.labels, self.cfg.label_smoothing), mask)
        per_sample = mixed_hard_ce(student, batch.labels, mix.partner_label.to(student.device),
                                   mix.lam.to(student.device), self.cfg.label_smoothing)
        return masked_mean(per_sample, mask)

    def ce_kd_terms(self, ce: torch.Tensor, kd: torch.Tensor, **logged: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss`` = ce_weight ce + kd_weight kd, with ``ce``, ``kd`` and the ``logged`` terms detached."""
        total = weighted_total([(self.cfg.ce_weight, ce), (self.cfg.kd_weight, kd)])
        return {"loss": total, "ce": ce.detach(), "kd": kd.detach(), **{k: v.detach() for k, v in logged.items()}}

    def extra_repr(self) -> str:
        return f"name={self.name}"


# Registered losses, name -> class. Filled by @register in the method modules, which
# :mod:`hpckd.losses.registry` imports; defined here, below them, so that no method module imports the registry.
LOSSES: dict[str, type[Loss]] = {}


def register(name: str) -> Callable[[type[Loss]], type[Loss]]:
    """Class decorator registering a Loss subclass under ``name`` (sets ``cls.name``)."""

    def wrap(cls: type[Loss]) -> type[Loss]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        cls.name = name
        LOSSES[name] = cls
        return cls

    return wrap


def compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """Half/bf16 logits up-cast to fp32 (softmax over 1000 classes loses too much in bf16); fp64 kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def valid_mask(batch: Batch, n: int, device: torch.device) -> torch.Tensor | None:
    """``batch.valid`` as a bool tensor on ``device`` (None when every sample counts)."""
    valid = batch.valid
    if valid is None:
        return None
    valid = valid.to(device=device, dtype=torch.bool).reshape(-1)
    if valid.numel() != n:
        raise ValueError(f"batch.valid has {valid.numel()} entries for {n} logits")
    return valid


def and_masks(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Elementwise AND of two optional masks (None means all True)."""
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def weighted_total(weights_terms: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """sum_i w_i * term_i, skipping zero weights (so an unused term costs nothing and cannot poison the sum)."""
    used = [w * t for w, t in weights_terms if w != 0]
    if not used:
        return weights_terms[0][1] * 0.0
    total = used[0]
    for t in used[1:]:
        total = total + t
    return total
