"""The one batch contract shared by loaders, batch ops, teachers, losses and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

STUDENT = "student"


@dataclass
class Batch:
    """A batch on the training device.

    Attributes:
        views: model role -> images (N, C, H, W). Always has ``"student"``; ``"teacher0"``, ``"teacher1"``, ...
            appear when a trial gives teachers their own view of the same samples.
        labels: (N,) int64 class labels.
        index: (N,) int64 global sample ids (position in the dataset index), for logit stores and metrics.
        epoch: the epoch this batch belongs to.
        aug: parameters that produced each view / what batch ops did (partner index, lambda, box), keyed by
            view name or op name, enough to replay them.
        valid: optional (N,) bool mask; False marks padding samples that must not count in metrics.
    """

    views: dict[str, torch.Tensor]
    labels: torch.Tensor
    index: torch.Tensor
    epoch: int = 0
    aug: dict[str, Any] = field(default_factory=dict)
    valid: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def view(self, role: str) -> torch.Tensor:
        """The view given to ``role`` (e.g. ``"teacher1"``), falling back to the student's view."""
        return self.views.get(role, self.views[STUDENT])

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(
            views={k: move(v) for k, v in self.views.items()},
            labels=move(self.labels),
            index=move(self.index),
            epoch=self.epoch,
            aug=self.aug,
            valid=None if self.valid is None else move(self.valid),
        )


IMAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ImageFormat:
    """How a loader hands images to the model: dtype and memory layout (``data.dtype``, ``train.channels_last``).

    Applied as the images move to the training device (one ``Tensor.to``): a CPU loader casts before the
    host-to-device copy, so bf16/fp16 also halve the copy. Channels-last keeps the NCHW shape with NHWC strides,
    the layout cuDNN's tensor-core convolutions prefer, so the model's own ``contiguous`` call is then a no-op.
    """

    dtype: str = "float32"  # float32 | bfloat16 | float16
    channels_last: bool = False

    def apply(self, images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        layout = torch.channels_last if self.channels_last and images.dim() == 4 else torch.preserve_format
        return images.to(device, dtype=IMAGE_DTYPES[self.dtype], memory_format=layout, non_blocking=True)
