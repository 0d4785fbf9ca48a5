"""The CIFAR ResNet-50 of the augmentation study's pairs (Wang et al. 2022, Table 1: ResNet50 -> MobileNetV2 /
vgg8), as in the CRD benchmark it runs on (Tian et al. 2020, RepDistiller ``models/resnetv2.py``).

An ImageNet ResNet-50 adapted to 32 px: a 3x3 stride-1 stem without max pooling, four stages of bottleneck blocks
(3, 4, 6, 3) with 64/128/256/512 planes (x4 expansion), global average pooling and one linear layer (23.7M
parameters at 100 classes). Module names follow RepDistiller's (``conv1``, ``bn1``, ``layer1..4``, ``shortcut``)
except the classifier, ``fc`` here (``linear`` there), so its published CIFAR teachers import with one rename
(:mod:`hpckd.teachers.importer`); ``features`` returns the last feature map (N, 2048, 4, 4) for CAMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpckd.models.registry import register


class Bottleneck(nn.Module):
    """relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x)) (He et al. 2016, Fig. 5 right)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarBottleneckResNet(nn.Module):
    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            layers = []
            for i in range(count):
                layers.append(Bottleneck(in_planes, planes, 2 if (stage > 0 and i == 0) else 1))
                in_planes = planes * Bottleneck.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map (N, 2048, h/8, w/8)."""
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@register("resnet50_cifar")
def resnet50_cifar(num_classes: int) -> CifarBottleneckResNet:
    return CifarBottleneckResNet((3, 4, 6, 3), num_classes)
