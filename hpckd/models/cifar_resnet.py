"""CIFAR ResNets for 32x32 inputs (He et al. 2016, Sec. 4.2): 6n+2 layers, widths 16/32/64.

resnet8/20/32/56/110 as used by the CRD benchmark the augmentation study runs on (Wang et al. 2022, Sec. 4), and
resnet8x4 / resnet32x4 with the CRD widths: a 32-channel stem and stages of 64/128/256 channels (Tian et al. 2020,
"Contrastive Representation Distillation"; 1.23M and 7.43M parameters at 100 classes). ``features`` returns the
last convolutional feature map, ``fc`` is the classifier, so class activation maps are ``fc.weight @ features``
(Zhou et al. 2016) and ``forward(x) == fc(mean_hw(features(x)))``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hpckd.models.registry import register


class BasicBlock(nn.Module):
    """Post-activation basic block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)) (He et al. 2016, Fig. 2)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Three-stage ResNet for 32x32 inputs; ``widths`` = (stem, stage1, stage2, stage3) channels."""

    def __init__(self, depth: int, num_classes: int, widths: tuple[int, int, int, int] = (16, 16, 32, 64)) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for stage, planes in enumerate(widths[1:]):
            for i in range(n):
                layers.append(BasicBlock(in_planes, planes, stride=2 if (stage > 0 and i == 0) else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last convolutional feature map (N, C, h, w)."""
        return self.layers(F.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _make(depth: int, widths: tuple[int, int, int, int] = (16, 16, 32, 64)) -> Callable[..., CifarResNet]:
    def build(num_classes: int, **kwargs) -> CifarResNet:
        return CifarResNet(depth, num_classes, widths, **kwargs)

    return build


for _depth in (8, 20, 32, 56, 110):
    register(f"resnet{_depth}")(_make(_depth))
register("resnet8x4")(_make(8, (32, 64, 128, 256)))
register("resnet32x4")(_make(32, (32, 64, 128, 256)))
