"""Parameter counts and forward multiply-accumulates (MACs), and the rows ``hpckd models`` prints.

MACs follow the convention of the published tables (e.g. the response-based study, Song et al. 2023, Tab. 2:
ResNet-18 1814.1M, ResNet-50 4089.2M, MobileNet V2 300.8M "FLOPs" for 224 px): one MAC per multiply-add of
convolutions, linear layers and attention matrix products; normalisation, activations, pooling and additions are
not counted. We count with ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per MAC) on *meta* tensors, so
no arithmetic runs and even ViT-B or VGG-19 are counted in milliseconds without touching the model's weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from hpckd.models import registry

DEFAULT_CLASSES = {"cifar": 100, "imagenet": 1000}


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_size: int | Sequence[int], channels: int = 3, batch: int = 1) -> int:
    """Forward MACs of ``model`` for ``batch`` images of ``input_size`` (int for square, or (H, W)).

    The model runs once on meta tensors (its parameters and buffers are swapped for meta stand-ins through
    ``torch.func.functional_call``), so its weights, BatchNorm statistics and device are left untouched.
    """
    height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    stand_ins = {name: torch.empty_like(t, device="meta") for name, t in _tensors(model)}
    x = torch.empty(batch, channels, height, width, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        functional_call(model, stand_ins, (x,))
    return counter.get_total_flops() // 2


def _tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


@dataclass(frozen=True)
class ModelRow:
    """One line of ``hpckd models``."""

    name: str
    family: str
    kind: str
    input_size: int
    num_classes: int
    params: int
    macs: int

    def as_dict(self) -> dict:
        return asdict(self)


def describe_models(
    names: Sequence[str] | None = None, num_classes: int | None = None, input_size: int | None = None
) -> list[ModelRow]:
    """Parameter count and MACs of each named model (all registered models by default).

    Args:
        names: registry names; ``None`` lists every model.
        num_classes: classifier size; ``None`` uses 100 for CIFAR nets and 1000 for ImageNet nets (the sizes the
            published counts refer to).
        input_size: square input side; ``None`` uses each model's native resolution (32 or 224).
    """
    rows = []
    for name in names if names is not None else registry.available():
        spec = registry.spec(name)
        classes = num_classes if num_classes is not None else DEFAULT_CLASSES[spec.family]
        size = input_size if input_size is not None else spec.input_size
        with torch.device("meta"):  # no memory and no initialisation cost, even for VGG-19's 144M parameters
            model = registry.create(name, classes)
        rows.append(ModelRow(name, spec.family, spec.kind, size, classes, count_params(model), count_macs(model, size)))
    return rows


def format_table(rows: Sequence[ModelRow]) -> str:
    """A plain-text table: name, family, input, classes, params (M), GMACs."""
    header = f"{'model':<20} {'family':<9} {'input':>5} {'classes':>7} {'params(M)':>10} {'GMACs':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        sizes = f"{r.params / 1e6:>10.2f} {r.macs / 1e9:>8.3f}"
        lines.append(f"{r.name:<20} {r.family:<9} {r.input_size:>5} {r.num_classes:>7} {sizes}")
    return "\n".join(lines)
