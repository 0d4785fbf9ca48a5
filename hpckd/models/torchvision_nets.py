"""The torchvision ImageNet networks the studies use, always built with ``weights=None``.

* resnet18/34/50/101 -- the attention study's ResNet-50 teachers and ResNet-18 students (Guo et al., Sec. 5), the
  augmentation study's resnet34 -> resnet18 ImageNet pair (Wang et al. 2022, Sec. 4), the response-based study's
  ResNet-18/34/50 (Song et al. 2023, Tab. 2).
* vgg16_bn / vgg19_bn -- the attention study's VGG19 teachers and VGG16 students (App. A.6).
* mobilenet_v2 -- the response-based study's MobileNet V2 (Tab. 2).
* vit_b_16 / vit_b_32 -- the attention study's ViT-B/32 teachers and ViT-B/16 student (App. A.7).

Nothing is downloaded: pretrained weights come from a local state-dict file given to
:func:`hpckd.models.weights.load_weights`, and state-dict keys stay exactly torchvision's so such files load.
Extra keyword arguments go to the torchvision builder (e.g. ``image_size=384`` for a ViT, ``dropout``).
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

from hpckd.models.registry import register

CNNS = ("resnet18", "resnet34", "resnet50", "resnet101", "vgg16_bn", "vgg19_bn", "mobilenet_v2")
VITS = ("vit_b_16", "vit_b_32")


def _make(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, **kwargs) -> nn.Module:
        builder = getattr(torchvision.models, name)
        return builder(weights=None, num_classes=num_classes, **kwargs)

    build.__name__ = name
    return build


for _name in CNNS:
    register(_name, input_size=224, family="imagenet", kind="cnn")(_make(_name))
for _name in VITS:
    register(_name, input_size=224, family="imagenet", kind="vit")(_make(_name))
