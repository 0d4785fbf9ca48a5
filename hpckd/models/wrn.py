"""Wide ResNets for 32x32 inputs (Zagoruyko & Komodakis 2016): ``wrn_{depth}_{k}``, depth = 6n+4.

The augmentation study's CIFAR-100 pairs include wrn_40_2 -> wrn_16_2 (Wang et al. 2022, Sec. 4, the CRD
benchmark of Tian et al. 2020). Stages have 16k/32k/64k channels after a 16-channel stem; blocks are
pre-activation (BN-ReLU-conv x2). As in the CRD code, when a block changes the width its 1x1 projection shortcut
reads the *pre-activated* input, while width-preserving blocks add the raw input (this matters for weight
compatibility, not for capacity). Published sizes at 100 classes: wrn_16_2 0.70M, wrn_40_2 2.26M parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hpckd.errors import ConfigError
from hpckd.models.registry import register


class WideBlock(nn.Module):
    """Pre-activation wide basic block with optional dropout between the two 3x3 convs."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        residual = x if self.shortcut is None else self.shortcut(act)
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs; ``features`` is the final BN-ReLU map (N, 64k, 8, 8), ``fc`` the classifier."""

    def __init__(self, depth: int, widen: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ConfigError(f"wide ResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        blocks, in_planes = [], 16
        for stage, width in enumerate(widths):
            for i in range(n):
                blocks.append(WideBlock(in_planes, width, 2 if (stage > 0 and i == 0) else 1, drop_rate))
                in_planes = width
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map after the final BN + ReLU, (N, 64k, 8, 8) at 32 px."""
        return F.relu(self.bn(self.layers(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _make(depth: int, widen: int) -> Callable[..., WideResNet]:
    def build(num_classes: int, drop_rate: float = 0.0) -> WideResNet:
        return WideResNet(depth, widen, num_classes, drop_rate=drop_rate)

    return build


for _depth, _widen in ((16, 2), (40, 1), (40, 2)):
    register(f"wrn_{_depth}_{_widen}")(_make(_depth, _widen))
