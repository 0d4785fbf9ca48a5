"""VGG networks for 32x32 inputs: vgg8/11/13/16/19 (CRD layout) and the fidelity study's VGG-16 head.

Default layout (``head="linear"``), as in the CRD benchmark the augmentation study uses (vgg13 -> vgg8,
vgg13 -> MobileNetV2; Wang et al. 2022, Sec. 4; Tian et al. 2020): five stages of 3x3 conv (+ BN) + ReLU with
64/128/256/512/512 channels, 2x2 max-pooling after the first three stages (and after the fourth for inputs of 64
px or more), global average pooling and one linear classifier, so class activation maps exist. Published sizes
at 100 classes: vgg8 3.96M, vgg13 9.46M parameters.

``head="mlp"`` with ``bn=False`` is the VGG-16 of the fidelity study (Stanton et al. 2021, App. A.2 and B.1:
"VGG-16 network without batch-normalization", adapted from torchvision): max-pooling after every stage and a
Dropout-512-512-classes MLP head. It has no single linear classifier, so CAMs are not defined for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hpckd.errors import ConfigError
from hpckd.models.registry import register

# Channels of the convs in each of the five stages.
CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}
HEADS = ("linear", "mlp")


def _stage(in_channels: int, widths: tuple[int, ...], bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers.append(nn.Conv2d(in_channels, width, 3, 1, 1))
        if bn:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
        in_channels = width
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    """VGG for small inputs; ``features`` gives the map before global pooling (N, 512, 4, 4 at 32 px)."""

    def __init__(self, depth: int, num_classes: int, bn: bool = True, head: str = "linear") -> None:
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"VGG: head must be one of {', '.join(HEADS)}, got {head!r}")
        self.head_kind = head
        stages, in_channels = [], 3
        for widths in CONFIGS[depth]:
            stages.append(_stage(in_channels, widths, bn))
            in_channels = widths[-1]
        self.stages = nn.ModuleList(stages)
        self.pool = nn.MaxPool2d(2, 2)
        if head == "linear":
            self.fc = nn.Linear(512, num_classes)
        else:
            self.classifier = nn.Sequential(
                nn.Dropout(),
                nn.Linear(512, 512),
                nn.ReLU(inplace=True),
                nn.Dropout(),
                nn.Linear(512, 512),
                nn.ReLU(inplace=True),
                nn.Linear(512, num_classes),
            )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def _pool_after(self, stage: int, input_size: int) -> bool:
        if self.head_kind == "mlp":
            return True  # the fidelity study's VGG pools after every stage (1x1 map at 32 px)
        # CRD skips the fourth pooling for 32 px inputs to keep a 4x4 map; larger inputs pool there as well.
        return stage < 3 or (stage == 3 and input_size >= 64)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map fed to the head: (N, 512, 4, 4) for the linear head at 32 px, (N, 512, 1, 1) for MLP."""
        input_size = x.shape[-2]
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if self._pool_after(i, input_size):
                x = self.pool(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        if self.head_kind == "linear":
            return self.fc(feats.mean(dim=(2, 3)))
        return self.classifier(torch.flatten(feats, 1))


def _make(depth: int) -> Callable[..., CifarVGG]:
    def build(num_classes: int, bn: bool = True, head: str = "linear") -> CifarVGG:
        return CifarVGG(depth, num_classes, bn=bn, head=head)

    return build


for _depth in CONFIGS:
    register(f"vgg{_depth}")(_make(_depth))
