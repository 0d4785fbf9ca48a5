"""Model zoo of the studies: ``create(name, num_classes)``, ``available()``, weights, complexity, metric hooks.

* :mod:`~hpckd.models.registry` -- names -> builders, each with its native input size (:func:`spec`).
* CIFAR nets (32 px): ``cifar_resnet`` (resnet8..110, resnet8x4, resnet32x4), ``preact_resnet`` (preresnet20/56/110
  with ``norm="bn"|"ln"``), ``wrn`` (wrn_16_2, wrn_40_1, wrn_40_2), ``cifar_vgg`` (vgg8..vgg19),
  ``cifar_mobilenetv2`` (mobilenetv2_cifar), ``cifar_shufflenet`` (shufflenetv1_cifar, shufflenetv2_cifar),
  ``cifar_resnet_bottleneck`` (resnet50_cifar, the augmentation study's CIFAR ResNet50).
* ImageNet nets (224 px, torchvision, ``weights=None``): resnet18/34/50/101, vgg16_bn, vgg19_bn, mobilenet_v2,
  vit_b_16, vit_b_32; from timm (``pretrained=False``, imported lazily): resnet18d, resnet34d, skresnet18,
  mobilenetv3_small_100, mobilenetv3_large_100, mobilenetv1_100.
* :func:`load_weights` -- local state-dict files or hpckd checkpoints, one clear error on any mismatch.
* :func:`count_params`, :func:`count_macs`, :func:`describe_models` -- what ``hpckd models`` prints.
* :func:`cam_features`, :func:`vit_attentions` -- the hooks the attention metrics use.
"""

# Registering imports first: each builder module adds its models to the registry.
from hpckd.models import (  # noqa: F401  (imported for their @register side effect)
    cifar_mobilenetv2,
    cifar_resnet,
    cifar_resnet_bottleneck,
    cifar_shufflenet,
    cifar_vgg,
    preact_resnet,
    timm_nets,
    torchvision_nets,
    wrn,
)
from hpckd.models.complexity import ModelRow, count_macs, count_params, describe_models, format_table
from hpckd.models.hooks import cam_features, forward_with_attentions, linear_head, unwrap, vit_attentions
from hpckd.models.registry import ModelSpec, available, create, register, spec
from hpckd.models.weights import apply_state_dict, load_weights

__all__ = [
    "ModelRow",
    "ModelSpec",
    "apply_state_dict",
    "available",
    "cam_features",
    "count_macs",
    "count_params",
    "create",
    "describe_models",
    "format_table",
    "forward_with_attentions",
    "linear_head",
    "load_weights",
    "register",
    "spec",
    "unwrap",
    "vit_attentions",
]
