"""The one batch contract shared by loaders, batch ops, teachers, losses and metrics."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

STUDENT = "student"


@dataclass
class LabelMix:
    """Per row of a batch made by Mixup, CutMix or CutMixPick: the hard-label target ``lam y_i + (1 - lam) y_j``
    (Zhang et al. 2018, Eq. 1; Yun et al. 2019, Eq. 1).

    Attributes:
        partner_label: (N,) int64 label y_j of the image mixed into the row (the row's own label where nothing was
            mixed in, e.g. the original half of a doubled batch).
        lam: (N,) float32 weight of the row's own label y_i (1.0 where nothing was mixed in).
    """

    partner_label: torch.Tensor
    lam: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = True) -> LabelMix:
        return LabelMix(self.partner_label.to(device, non_blocking=non_blocking),
                        self.lam.to(device, non_blocking=non_blocking))


@dataclass
class KnownLogits:
    """The teachers' logits of the trailing rows of a batch, already computed by a batch op: CutMixPick's kept
    rows are pool rows the teachers scored, on the very images (every view, ``teacher{k}`` included, is gathered
    from the pool), so the training step reuses the pool's logits instead of running the teachers (or reading a
    logit store) a second time (issue 17; :func:`hpckd.data.batchops.teacher_logits_after_ops`).

    Attributes:
        logits: one fp32 (M, C) tensor per teacher, on the device: the teachers' logits of the last M rows.
        head: the rows before them, as a batch of their own (the loader's rows of a doubled batch, with their host
            ids), on which the teachers still run; None when the M rows are the whole batch.
    """

    logits: list[torch.Tensor]
    head: Batch | None = None

    def to(self, device: torch.device | str, non_blocking: bool = True) -> KnownLogits:
        return KnownLogits([t.to(device, non_blocking=non_blocking) for t in self.logits],
                           None if self.head is None else self.head.to(device, non_blocking))


@dataclass
class Batch:
    """A batch on the training device.

    Attributes:
        views: model role -> images (N, C, H, W). Always has ``"student"``; ``"teacher0"``, ``"teacher1"``, ...
            appear when a trial gives teachers their own view of the same samples.
        labels: (N,) int64 class labels.
        index: (N,) int64 global sample ids (position in the dataset index), for logit stores and metrics.
        epoch: the epoch this batch belongs to.
        aug: replay parameters only: what produced each view (keyed by view name) and what batch ops drew (keyed by
            op name: partner, lambda, box, pick ...), enough to replay them. Nothing in it changes what a loss does.
        valid: optional (N,) bool mask; False marks padding samples that must not count in metrics.
        doubled: optional (N,) bool, True on the rows x' = scheme(x) that the augmentation study's doubled batch
            appends (Wang et al. 2022, Sec. 4.1); the ``kd_da`` loss trains those rows with the KL term only.
        label_mix: optional :class:`LabelMix`, set by Mixup/CutMix/CutMixPick: the mixed hard-label target of
            every row.
        host_index: optional (N,) int64 numpy copy of ``index`` on the host, row for row. The loaders set it from
            the CPU ids they have before the host-to-device copy and the batch ops reorder it with their (host) row
            choices, so what needs the ids on the host (a logit store's lookups, the batch ops' keyed draws) reads
            them without a device-to-host copy, i.e. without waiting for the device (:meth:`ids`). None where the
            ids are only on the device: CutMixPick's output without a half split, whose kept rows are chosen on the
            device and never needed on the host by the training step (:meth:`ids` then reads ``index``).
        known_logits: optional :class:`KnownLogits`, set by CutMixPick (without a half split): the teachers' logits
            of its kept rows, taken from the pool it scored; the training step runs the teachers only on
            ``known_logits.head``.
    """

    views: dict[str, torch.Tensor]
    labels: torch.Tensor
    index: torch.Tensor
    epoch: int = 0
    aug: dict[str, Any] = field(default_factory=dict)
    valid: torch.Tensor | None = None
    doubled: torch.Tensor | None = None
    label_mix: LabelMix | None = None
    host_index: np.ndarray | None = None
    known_logits: KnownLogits | None = None

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def view(self, role: str) -> torch.Tensor:
        """The view given to ``role`` (e.g. ``"teacher1"``), falling back to the student's view."""
        return self.views.get(role, self.views[STUDENT])

    def replace(self, **changes: Any) -> Batch:
        """A new batch with ``changes`` (field name -> value) applied; the other fields are shared, not copied.

        New rows (``index`` changed) without a matching ``host_index`` drop the host copy: a stale one would name
        the wrong samples, and :meth:`ids` then reads ``index`` instead. New rows or new images (``views``
        changed, e.g. the half split) without matching ``known_logits`` drop those: they were the teachers' logits
        of the old images."""
        if "index" in changes and "host_index" not in changes:
            changes["host_index"] = None
        if ("index" in changes or "views" in changes) and "known_logits" not in changes:
            changes["known_logits"] = None
        return dataclasses.replace(self, **changes)

    def ids(self) -> np.ndarray:
        """(N,) int64 global sample ids on the host: :attr:`host_index` (no device involved; do not modify it).

        Batches the loaders did not make (hand-built ones in tests and tools) and CutMixPick's output without a half
        split (its kept rows are chosen on the device) lack it: the ids are then copied from ``index``, which on a
        GPU waits for the device queue. The training step never takes that path (it looks up
        ``known_logits.head``, whose ids are the loader's); the logit store's writer and verifier, and tools, may."""
        if self.host_index is not None:
            return self.host_index
        return self.index.detach().cpu().numpy().astype(np.int64)

    def variants(self) -> np.ndarray:
        """(N,) int64 ``aug["variant"]`` on the host: which image of its sample each row is, for a logit store
        (0 = the loader's view; the batch ops' meanings in :mod:`hpckd.data.batchops`). Zeros when no batch op
        ran. CutMixPick without a half split keeps them on the device (a tensor: its kept rows are chosen there);
        they are then copied to the host, which waits for the device, like :meth:`ids` without ``host_index``:
        only callers off the hot path do that (the store writer, tools, tests)."""
        variant = self.aug.get("variant")
        if variant is None:
            return np.zeros(self.size, np.int64)
        if isinstance(variant, torch.Tensor):
            return variant.detach().cpu().numpy().astype(np.int64)
        return np.asarray(variant, np.int64)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        host = self.host_index
        if host is None and self.index.device.type == "cpu":
            host = host_array(self.index)  # still on the host: keep a copy before the ids leave it
        return self.replace(
            views={k: v.to(device, non_blocking=non_blocking) for k, v in self.views.items()},
            labels=move(self.labels),
            index=move(self.index),
            host_index=host,
            valid=move(self.valid),
            doubled=move(self.doubled),
            label_mix=None if self.label_mix is None else self.label_mix.to(device, non_blocking),
            known_logits=None if self.known_logits is None else self.known_logits.to(device, non_blocking),
        )


def host_array(t: torch.Tensor) -> np.ndarray:
    """A flat int64 numpy copy of a tensor that is already on the host (a loader's sample ids, row numbers chosen
    on the host).

    A copy, never a view: DALI's iterator may hand DLPack views of the pipeline's own output buffers (its dynamic
    executor), whose reuse the loader does not control; the batch keeps its ids. Made with ``copy_`` into
    numpy-owned memory, which reads no device: a tensor on a device is refused rather than copied, so this can
    never hide a device-to-host transfer (tests/test_hotpath*.py count the torch methods that can, such as
    ``Tensor.numpy``, on every device)."""
    if t.device.type != "cpu":
        raise ValueError(f"host_array needs a tensor on the host, not on {t.device}")
    out = np.empty(t.numel(), np.int64)
    torch.from_numpy(out).copy_(t.reshape(-1))
    return out


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
