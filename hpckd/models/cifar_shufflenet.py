"""ShuffleNet V1 and V2 for 32x32 inputs, as the "ShuffleV1" / "ShuffleV2" students of the CRD benchmark.

The augmentation study distils resnet32x4 -> ShuffleV2 and wrn_40_2 -> ShuffleV1 on CIFAR-100 (Wang et al. 2022,
Sec. 4; the CRD benchmark of Tian et al. 2020). Both keep the full 32 px resolution in the stem and downsample
three times (32 -> 16 -> 8 -> 4), then pool globally.

* V1 (Zhang et al. 2018, Fig. 2): grouped 1x1 convs with channel shuffle around a depthwise 3x3; a downsampling
  unit concatenates a 3x3 average-pooled shortcut. CRD's configuration: 240/480/960 channels, 4/8/4 units,
  3 groups, a 1x1 24-channel stem. Published size at 100 classes: 0.95M parameters.
* V2 (Ma et al. 2018, Fig. 3): channel split, a 1x1-dw3x3-1x1 branch, concat and shuffle; downsampling units run
  both halves through strided branches. CRD's net_size 1: 116/232/464 channels, one downsampling unit followed by
  3/7/3 basic units, a 3x3 24-channel stem and a 1x1 conv to 1024 channels. Published size at 100 classes:
  1.36M parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpckd.models.registry import register


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups (Zhang et al. 2018, Sec. 3.1)."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _bn_conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(out_ch)
    )


class ShuffleV1Unit(nn.Module):
    """ShuffleNet V1 unit; with stride 2 the output concatenates the pooled input (so ``out_ch`` excludes it)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = out_ch // 4
        # The first unit after the 24-channel stem uses an ungrouped 1x1 conv (input too narrow to group).
        self.first_groups = 1 if in_ch == 24 else groups
        self.reduce = _bn_conv(in_ch, mid, 1, groups=self.first_groups)
        self.depthwise = _bn_conv(mid, mid, 3, stride, groups=mid)
        self.expand = _bn_conv(mid, out_ch, 1, groups=groups)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.reduce(x)), self.first_groups)
        out = self.expand(self.depthwise(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], dim=1))
        return F.relu(out + x)


class CifarShuffleNetV1(nn.Module):
    """``features`` is the last unit's output (N, 960, 4, 4 at 32 px); ``fc`` the classifier."""

    def __init__(
        self,
        num_classes: int,
        out_channels: tuple[int, ...] = (240, 480, 960),
        units: tuple[int, ...] = (4, 8, 4),
        groups: int = 3,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
        blocks, in_ch = [], 24
        for width, count in zip(out_channels, units):
            for i in range(count):
                # A downsampling unit's own branch supplies width - in_ch channels; the shortcut adds in_ch.
                blocks.append(ShuffleV1Unit(in_ch, width - in_ch if i == 0 else width, 2 if i == 0 else 1, groups))
                in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class ShuffleV2Unit(nn.Module):
    """ShuffleNet V2 basic unit: split channels in half, transform one half, concat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.half = half
        self.branch = nn.Sequential(
            _bn_conv(half, half, 1),
            nn.ReLU(inplace=True),
            _bn_conv(half, half, 3, groups=half),  # depthwise, no activation (Ma et al. 2018, Fig. 3)
            _bn_conv(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, transform = x[:, : self.half], x[:, self.half :]
        return channel_shuffle(torch.cat([keep, F.relu(self.branch(transform))], dim=1), 2)


class ShuffleV2Down(nn.Module):
    """ShuffleNet V2 downsampling unit: two strided branches, each producing half of ``out_ch``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = out_ch // 2
        self.left = nn.Sequential(
            _bn_conv(in_ch, in_ch, 3, 2, groups=in_ch), _bn_conv(in_ch, mid, 1), nn.ReLU(inplace=True)
        )
        self.right = nn.Sequential(
            _bn_conv(in_ch, mid, 1),
            nn.ReLU(inplace=True),
            _bn_conv(mid, mid, 3, 2, groups=mid),
            _bn_conv(mid, mid, 1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], dim=1), 2)


class CifarShuffleNetV2(nn.Module):
    """``features`` is the 1024-channel map before pooling (N, 1024, 4, 4 at 32 px); ``fc`` the classifier."""

    def __init__(
        self,
        num_classes: int,
        out_channels: tuple[int, ...] = (116, 232, 464),
        units: tuple[int, ...] = (3, 7, 3),
        last_channels: int = 1024,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(_bn_conv(3, 24, 3), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        in_ch = 24
        for width, count in zip(out_channels, units):
            blocks.append(ShuffleV2Down(in_ch, width))
            blocks.extend(ShuffleV2Unit(width) for _ in range(count))
            in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.head_conv = _bn_conv(in_ch, last_channels, 1)
        self.fc = nn.Linear(last_channels, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.head_conv(self.blocks(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@register("shufflenetv1_cifar")
def shufflenetv1_cifar(num_classes: int) -> CifarShuffleNetV1:
    return CifarShuffleNetV1(num_classes)


@register("shufflenetv2_cifar")
def shufflenetv2_cifar(num_classes: int) -> CifarShuffleNetV2:
    return CifarShuffleNetV2(num_classes)
