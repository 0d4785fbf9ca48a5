"""Mixed precision, decided in one place: :class:`PrecisionPolicy` says how every forward pass runs.

Parameters, optimizer state and the loss stay fp32 in every mode; only forward passes run under
``torch.autocast``. Logits are cast back to fp32 before the loss, because KD losses divide by a temperature and
exponentiate (a bf16 softmax at tau = 4 loses most of the mantissa the soft targets live in). fp16 needs loss
scaling (Micikevicius et al. 2018, "Mixed Precision Training", Sec. 3.2) against gradient underflow; bf16 has
fp32's exponent range and does not.

Who runs how:

* the student (training step, CutMixPick scoring, evaluation): autocast of ``train.precision``, channels-last
  inputs when ``train.channels_last``;
* teachers (training and evaluation alike, so the logits a student learns from are the ones its fidelity is
  measured against): bf16 autocast and channels-last on CUDA when ``serving.amp`` / ``serving.channels_last``
  (frozen inference tolerates bf16), otherwise the student's autocast; in the evaluation pass the teachers run
  at ``metrics.teacher_precision`` instead (fp32 by default, so fidelity, MI, CAM-IoU and T. stddev are measured
  on fp32 teachers; ``bf16`` reproduces the training-time logits, :meth:`PrecisionPolicy.for_analysis`);
* images from the loaders: ``data.dtype`` in training (checked against ``train.precision``), float32 in
  evaluation, channels-last when ``train.channels_last`` (:class:`hpckd.data.batch.ImageFormat`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, ContextManager

import torch

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS: tuple[str, ...] = tuple(DTYPES)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` (None = plain fp32)."""
    return DTYPES[precision]


def autocast_to(dtype: torch.dtype | None, device: torch.device) -> ContextManager:
    """``torch.autocast`` to ``dtype``, or a no-op context for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def autocast(precision: str, device: torch.device) -> ContextManager:
    """``torch.autocast`` for a forward pass at ``train.precision``, or a no-op context for fp32."""
    return autocast_to(autocast_dtype(precision), device)


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16, else None (bf16 and fp32 need none)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


@dataclass(frozen=True)
class PrecisionPolicy:
    """How the student, the teachers and evaluation run on ``device`` (see the module docstring)."""

    device: torch.device
    precision: str = "fp32"  # train.precision
    channels_last: bool = False  # train.channels_last (student inputs)
    teacher_amp: bool = True  # serving.amp: bf16 teachers on CUDA
    teacher_channels_last_on_cuda: bool = True  # serving.channels_last
    teacher_analysis: str | None = None  # metrics.teacher_precision in the evaluation pass (fp32 | bf16); None: training

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device) -> "PrecisionPolicy":
        serving = cfg.get("serving") if hasattr(cfg, "get") else getattr(cfg, "serving", None)
        return cls(device=torch.device(device), precision=str(cfg.train.precision),
                   channels_last=bool(cfg.train.channels_last),
                   teacher_amp=bool(serving.amp) if serving is not None else True,
                   teacher_channels_last_on_cuda=bool(serving.channels_last) if serving is not None else True)

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    # ---------------------------------------------------------------- student
    def student_autocast(self) -> ContextManager:
        return autocast(self.precision, self.device)

    def student_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def scaler(self) -> torch.amp.GradScaler | None:
        return make_scaler(self.precision, self.device)

    # ---------------------------------------------------------------- teachers
    def for_analysis(self, teacher_precision: str) -> "PrecisionPolicy":
        """This policy with the teachers at ``metrics.teacher_precision``: ``"fp32"`` (no autocast) or ``"bf16"``
        (bf16 autocast on any device, as training's ``serving.amp`` on CUDA)."""
        if teacher_precision not in ("fp32", "bf16"):
            raise ValueError(f"teacher_precision must be fp32 or bf16, got {teacher_precision!r}")
        return dataclasses.replace(self, teacher_analysis=teacher_precision)

    @property
    def teacher_dtype(self) -> torch.dtype | None:
        if self.teacher_analysis is not None:
            return None if self.teacher_analysis == "fp32" else torch.bfloat16
        if self.on_cuda and self.teacher_amp:
            return torch.bfloat16
        return autocast_dtype(self.precision)

    @property
    def teacher_channels_last(self) -> bool:
        return self.on_cuda and self.teacher_channels_last_on_cuda

    def teacher_autocast(self) -> ContextManager:
        return autocast_to(self.teacher_dtype, self.device)

    def teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.teacher_channels_last and x.dim() == 4 else x
