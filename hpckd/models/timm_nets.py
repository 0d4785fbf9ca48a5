"""ImageNet networks from timm (Wightman, "PyTorch Image Models"): the response-based study's architectures.

The response-based study (Song et al., ACM MM 2023, Tab. 2 and Sec. 5) distils between ResNet-18d/34d,
SKResNet-18, MobileNetV3 small/large and MobileNet V1 on ImageNet; torchvision has none of them, timm has all:

==========================  ===========================  ======================================================
hpckd name (= timm's)       paper's name                 notes
==========================  ===========================  ======================================================
resnet18d, resnet34d        ResNet-18d / ResNet-34d      deep stem + avg-pool shortcut (Bag of Tricks, He 2019)
skresnet18                  SKResNet-18                  selective kernels (Li et al. 2019)
mobilenetv3_small_100       MobileNetV3-Small (1.0x)
mobilenetv3_large_100       MobileNetV3-Large (1.0x)
mobilenetv1_100             MobileNet V1 (1.0x)          timm's re-implementation
==========================  ===========================  ======================================================

timm is imported only when one of these is built (``hpckd models`` and every other model work without it), and
always with ``pretrained=False``: nothing is downloaded. Published weights come from a local file through
``hpckd teachers import FILE --arch NAME`` or ``model.weights`` (state-dict keys are timm's own). The ResNets get
``features`` (timm's ``forward_features``: the last map before global pooling + ``fc``), so CAMs work on them; the
MobileNetV3s apply a 1x1 convolution *after* pooling, so they have no class activation map. The attention study's
ViTs stay torchvision's (``vit_b_16``/``vit_b_32``): :func:`hpckd.models.vit_attentions` reads their attention.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hpckd.errors import ConfigError
from hpckd.models.registry import register

CAM_NETS = ("resnet18d", "resnet34d", "skresnet18")
OTHER_NETS = ("mobilenetv3_small_100", "mobilenetv3_large_100", "mobilenetv1_100")


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise ConfigError("this architecture comes from timm: pip install timm (see constraints.txt)") from exc
    return timm


def _make(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, **kwargs) -> nn.Module:
        model = _timm().create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        if name in CAM_NETS:
            # the map that timm's head pools into ``fc``: what hpckd.models.cam_features reads
            model.features = model.forward_features
        return model

    build.__name__ = name
    return build


for _name in CAM_NETS + OTHER_NETS:
    register(_name, input_size=224, family="imagenet", kind="cnn")(_make(_name))
