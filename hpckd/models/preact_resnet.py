"""Pre-activation ResNets for 32x32 inputs, with BatchNorm or LayerNorm (the fidelity study's networks).

The fidelity study (Stanton et al. 2021, App. A.2 "Image Classifiers") uses "preactivation ResNets with batchnorm,
skip connections and the standard three-stage macro-structure" with 16/32/64 filters per stage and depths 20, 56
and 110 (He et al. 2016b, "Identity Mappings in Deep Residual Networks"). For its optimisation experiments
(Sec. 5.2) it replaces BatchNorm with LayerNorm (Ba et al. 2016) "because ... with BatchNorm layers even when the
teacher and the student have identical weights, they can make different predictions due to differences in the
activation statistics"; ``norm="ln"`` (or the names ``preresnet20_ln``/``56_ln``/``110_ln``) gives that variant.

Known difference between the paper and its public code (a config option, ``block``):
  the text describes basic residual blocks at every depth, while the public code (ported from bearpaw's
  pytorch-classification) switches to bottleneck blocks with 4x expansion for depth >= 44 (depth = 9n+2), so its
  ResNet-56 and ResNet-110 end in 256 channels. ``block="auto"`` (default) follows the public code,
  ``block="basic"`` the text (depth = 6n+2), ``block="bottleneck"`` forces bottlenecks.

LayerNorm over a conv feature map normalises each sample over (C, H, W); we implement it as ``GroupNorm(1, C)``,
which computes exactly those statistics and keeps a per-channel affine transform, so the network stays
resolution-independent and keeps no running statistics at all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hpckd.errors import ConfigError
from hpckd.models.registry import register

NORMS = ("bn", "ln")
BLOCKS = ("auto", "basic", "bottleneck")


def make_norm(kind: str, channels: int) -> nn.Module:
    """``"bn"`` -> BatchNorm2d; ``"ln"`` -> LayerNorm over (C, H, W) per sample, as GroupNorm with one group."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "ln":
        return nn.GroupNorm(1, channels)
    raise ConfigError(f"pre-activation ResNet: norm must be one of {', '.join(NORMS)}, got {kind!r}")


class PreActBasic(nn.Module):
    """x + conv(relu(norm(conv(relu(norm(x)))))) (He et al. 2016b, Fig. 4(e))."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.norm2 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = _projection(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return out + self.shortcut(x)


class PreActBottleneck(nn.Module):
    """x + conv1x1(relu(norm(conv3x3(relu(norm(conv1x1(relu(norm(x))))))))), output 4 * planes channels."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.norm1 = make_norm(norm, in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.norm2 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.norm3 = make_norm(norm, planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.shortcut = _projection(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        out = self.conv3(F.relu(self.norm3(out)))
        return out + self.shortcut(x)


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    # The public code projects the raw (not pre-activated) input with a bare 1x1 conv when the shape changes.
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)


def resolve_block(depth: int, block: str) -> tuple[type[nn.Module], int]:
    """(block class, blocks per stage) for ``depth``; see the module docstring for ``block="auto"``."""
    if block not in BLOCKS:
        raise ConfigError(f"pre-activation ResNet: block must be one of {', '.join(BLOCKS)}, got {block!r}")
    bottleneck = block == "bottleneck" or (block == "auto" and depth >= 44)
    per_block_layers = 9 if bottleneck else 6
    if (depth - 2) % per_block_layers:
        kind = "bottleneck" if bottleneck else "basic"
        raise ConfigError(f"pre-activation ResNet depth with {kind} blocks must be {per_block_layers}n+2, got {depth}")
    return (PreActBottleneck if bottleneck else PreActBasic), (depth - 2) // per_block_layers


class PreActResNet(nn.Module):
    """Three-stage pre-activation ResNet: conv stem, 3 stages (16/32/64 planes), final norm + ReLU, GAP, linear."""

    def __init__(
        self,
        depth: int,
        num_classes: int,
        norm: str = "bn",
        block: str = "auto",
        planes: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        block_cls, n = resolve_block(depth, block)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        stages, in_planes = [], 16
        for stage, width in enumerate(planes):
            for i in range(n):
                stages.append(block_cls(in_planes, width, 2 if (stage > 0 and i == 0) else 1, norm))
                in_planes = width * block_cls.expansion
        self.layers = nn.Sequential(*stages)
        self.norm = make_norm(norm, in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map (N, C, 8, 8) after the final norm + ReLU, i.e. what global pooling sees."""
        return F.relu(self.norm(self.layers(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _make(depth: int) -> Callable[..., PreActResNet]:
    def build(num_classes: int, norm: str = "bn", block: str = "auto", **kwargs) -> PreActResNet:
        return PreActResNet(depth, num_classes, norm=norm, block=block, **kwargs)

    return build


def _make_ln(depth: int) -> Callable[..., PreActResNet]:
    # A named LayerNorm variant, so the fidelity study's Sec. 5.2 networks need only an ``arch`` string.
    def build(num_classes: int, block: str = "auto", **kwargs) -> PreActResNet:
        return PreActResNet(depth, num_classes, norm="ln", block=block, **kwargs)

    return build


for _depth in (20, 56, 110):
    register(f"preresnet{_depth}")(_make(_depth))
    register(f"preresnet{_depth}_ln")(_make_ln(_depth))
