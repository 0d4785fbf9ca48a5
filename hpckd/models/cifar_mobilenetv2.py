"""MobileNetV2 for 32x32 inputs, as the "MobileNetV2" student of the CRD benchmark (``mobilenetv2_cifar``).

Inverted residual blocks (Sandler et al. 2018, Table 2) adapted to CIFAR the way the CRD benchmark does it
(Tian et al. 2020), which the augmentation study uses for its vgg13 -> MobileNetV2 and resnet50 -> MobileNetV2
pairs (Wang et al. 2022, Sec. 4): width multiplier 0.5, expansion 6, a stride-2 stem, stride 1 in the 24-channel
stage, ReLU activations, every block starts with a 1x1 expansion conv (also when t = 1), and a 1x1 conv to 1280
channels before global pooling. Published size at 100 classes: 0.81M parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpckd.models.registry import register

# (expansion t, output channels c, repeats n, first stride s) per stage; ``None`` = the model's expansion.
STAGES: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(out_ch)]


class InvertedResidual(nn.Module):
    """1x1 expand + ReLU, 3x3 depthwise + ReLU, 1x1 linear projection; identity shortcut when shapes agree."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.body = nn.Sequential(
            *_conv_bn(in_ch, hidden, 1),
            nn.ReLU(inplace=True),
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.ReLU(inplace=True),
            *_conv_bn(hidden, out_ch, 1),
        )
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class CifarMobileNetV2(nn.Module):
    """``features`` is the 1280-channel map before pooling (N, 1280, 2, 2 at 32 px); ``fc`` the classifier."""

    def __init__(
        self, num_classes: int, width_mult: float = 0.5, expansion: int = 6, last_channels: int = 1280
    ) -> None:
        super().__init__()
        in_ch = int(32 * width_mult)
        self.stem = nn.Sequential(*_conv_bn(3, in_ch, 3, 2), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        for t, c, n, s in STAGES:
            out_ch = int(c * width_mult)
            for i in range(n):
                blocks.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, expansion if t is None else t))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        # Widths above 1 scale the last conv too (as in the original MobileNetV2); below 1 it stays at 1280.
        last = int(last_channels * width_mult) if width_mult > 1.0 else last_channels
        self.head_conv = nn.Sequential(*_conv_bn(in_ch, last, 1))
        self.fc = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.head_conv(self.blocks(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@register("mobilenetv2_cifar")
def mobilenetv2_cifar(num_classes: int, width_mult: float = 0.5, expansion: int = 6) -> CifarMobileNetV2:
    return CifarMobileNetV2(num_classes, width_mult=width_mult, expansion=expansion)
