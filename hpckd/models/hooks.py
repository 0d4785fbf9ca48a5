"""The uniform hooks the metrics use: CNN feature maps + classifier (for CAMs) and ViT attention maps.

* :func:`cam_features` returns the last convolutional feature map ``A`` (N, C, h, w) and the linear classifier
  ``(W, b)`` applied after global average pooling, so that ``logits = W @ mean_hw(A) + b`` and the class
  activation map of class k is ``sum_c W[k, c] * A[:, c]`` (Zhou et al. 2016, Eq. 2; the attention study's CAM-IoU,
  Guo et al. Sec. 4.3). Works for every CNN of the registry whose head is global pooling + one linear layer.
* :func:`vit_attentions` returns, for a torchvision VisionTransformer, the per-head attention probabilities of
  every encoder block (N, heads, T, T) with T = 1 + number of patches (the attention study's ViT variant,
  App. A.7: "directly use the built-in attention module").

Both accept models wrapped in DDP (``.module``) or ``torch.compile`` (``._orig_mod``).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from hpckd.errors import UserError

Trunk = Callable[[torch.Tensor], torch.Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DeepSpeed (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def linear_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """(qualified name, module) of the classifier layer that maps pooled features to logits."""
    model = unwrap(model)
    if isinstance(model, torchvision.models.VisionTransformer):
        return "heads.head", model.heads.head  # type: ignore[return-value]
    for name in ("fc", "classifier", "head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return name, head
        if isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear):
            return f"{name}.{len(head) - 1}", head[-1]
    raise UserError(f"{type(model).__name__} has no recognisable linear classifier (fc / classifier / head)")


def _cam_parts(model: nn.Module) -> tuple[Trunk, nn.Linear]:
    name = type(model).__name__
    if isinstance(model, torchvision.models.VisionTransformer):
        raise UserError(f"{name} has no convolutional feature map: use hpckd.models.vit_attentions for ViTs")
    if isinstance(model, torchvision.models.VGG):
        raise UserError(
            f"{name} (torchvision) ends in a 3-layer MLP, so class activation maps are undefined; "
            f"use a CIFAR VGG (vgg8..vgg19) with its global-pooling linear head"
        )
    if isinstance(model, torchvision.models.ResNet):
        return _torchvision_resnet_trunk(model), model.fc
    if isinstance(model, torchvision.models.MobileNetV2):
        return model.features, _only_linear(model.classifier, name)
    features = getattr(model, "features", None)
    head = getattr(model, "fc", None)
    if callable(features) and isinstance(head, nn.Linear):
        return features, head
    raise UserError(
        f"{name} does not expose a feature map + linear classifier (features(x) and fc), so CAMs are undefined"
    )


def _torchvision_resnet_trunk(model: torchvision.models.ResNet) -> Trunk:
    def trunk(x: torch.Tensor) -> torch.Tensor:
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        return model.layer4(model.layer3(model.layer2(model.layer1(x))))

    return trunk


def _only_linear(classifier: nn.Module, name: str) -> nn.Linear:
    # torchvision's MobileNetV2 head is Dropout + Linear: the dropout is the identity in eval mode.
    layers = list(classifier) if isinstance(classifier, nn.Sequential) else [classifier]
    linears = [m for m in layers if not isinstance(m, nn.Dropout)]
    if len(linears) != 1 or not isinstance(linears[0], nn.Linear):
        raise UserError(f"{name}: classifier is not a single linear layer, so CAMs are undefined")
    return linears[0]


def cam_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(feature map (N, C, h, w), classifier weight (K, C), classifier bias (K,) or None) for a CNN.

    Runs only the convolutional trunk on ``x``; the caller chooses the mode (``model.eval()`` for metrics) and the
    grad context. ``fc(mean_hw(features)) == model(x)`` for every registered CNN with a linear head.
    """
    trunk, head = _cam_parts(unwrap(model))
    feats = trunk(x)
    if feats.dim() == 4 and feats.shape[-2] * feats.shape[-1] == 1:
        _warn_flat_cam(model, int(x.shape[-1]), int(x.shape[-1]) // max(1, int(feats.shape[-1])))
    return feats, head.weight, head.bias


def forward_with_cam(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor | None]:
    """(logits, feature map, classifier weight, classifier bias) of a CNN from ONE forward pass.

    The model's own forward gives the logits; the last convolutional feature map is captured on its way to the
    head (a forward hook on the trunk's last module, or the ``features`` / ``forward_features`` method wrapped for
    this one call), so the evaluation runs each teacher once per batch instead of once for the logits and once more
    for :func:`cam_features`. The map is the one :func:`cam_features` returns, bit for bit: the same modules on the
    same input. A model whose forward does not pass through the capture point gets the trunk-only pass."""
    inner = unwrap(model)
    trunk, head = _cam_parts(inner)
    captured: list[torch.Tensor] = []
    with _capturing_feature_map(inner, captured):
        logits = model(x)
    feats = captured[-1] if captured else trunk(x)
    if feats.dim() == 4 and feats.shape[-2] * feats.shape[-1] == 1:
        _warn_flat_cam(model, int(x.shape[-1]), int(x.shape[-1]) // max(1, int(feats.shape[-1])))
    return logits, feats, head.weight, head.bias


@contextlib.contextmanager
def _capturing_feature_map(model: nn.Module, captured: list[torch.Tensor]) -> Iterator[None]:
    """Append the trunk's output to ``captured`` during the forward passes inside the block; nothing stays behind."""
    def keep(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        captured.append(out)

    if isinstance(model, torchvision.models.ResNet):
        module: nn.Module | None = model.layer4
    else:
        features = getattr(model, "features", None)
        module = features if isinstance(features, nn.Module) else None
    if module is not None:
        handle = module.register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()
        return
    # ``features`` is a method (the registry's CIFAR nets; timm nets call ``forward_features``): wrap it on the
    # instance for this call only (an instance attribute shadows the class's method), then put back what was there.
    names = [n for n in ("features", "forward_features") if callable(getattr(model, n, None))]
    saved = {n: model.__dict__[n] for n in names if n in model.__dict__}
    for name in names:
        original = getattr(model, name)

        def wrapped(*args: Any, _original: Callable[..., torch.Tensor] = original, **kwargs: Any) -> torch.Tensor:
            out = _original(*args, **kwargs)
            captured.append(out)
            return out

        object.__setattr__(model, name, wrapped)
    try:
        yield
    finally:
        for name in names:
            if name in saved:
                object.__setattr__(model, name, saved[name])
            else:
                object.__delattr__(model, name)


class CamResolutionWarning(UserWarning):
    """Class activation maps of 1x1: the input is too small for the network's downsampling."""


_WARNED: set[tuple[str, int]] = set()


def _warn_flat_cam(model: nn.Module, size: int, stride: int) -> None:
    """Warn once per (architecture, input size): a 1x1 map has no spatial extent, so CAM-IoU (attention study
    Eq. 1) is 1 or 0 for every image, whatever the teachers attend to (an ImageNet ResNet-50 at 32 px)."""
    arch = getattr(unwrap(model), "hpckd_arch", type(unwrap(model)).__name__)
    if (arch, size) in _WARNED:
        return
    _WARNED.add((arch, size))
    warnings.warn(f"{arch} at data.image_size={size} gives 1x1 class activation maps (it downsamples {stride}x), so "
                  f"CAM-IoU is meaningless; set data.image_size >= {7 * stride} or use a CIFAR architecture "
                  f"(or metrics.attention_iou=false)", CamResolutionWarning, stacklevel=3)


def has_cam(model: nn.Module) -> bool:
    """Whether :func:`cam_features` applies (a CNN whose linear classifier reads globally pooled features)."""
    try:
        _cam_parts(unwrap(model))
    except UserError:
        return False
    return True


def forward_with_attentions(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, per-block attention probabilities (N, heads, T, T)) of a model built on nn.MultiheadAttention, from
    ONE forward pass.

    The model's own forward runs unchanged, so the logits are bit for bit those of ``model(x)``: its blocks call
    their attention with ``need_weights=False`` (torch's fused kernels: the native MHA fast path, or SDPA). A forward
    hook on each attention layer computes ``softmax(Q K^T / sqrt(d_head))`` per head (Vaswani et al. 2017, Eq. 1;
    the attention study's ViT maps, App. A.7) from the layer's input on the side, which costs the Q and K
    projections of each block, not a second forward. Asking the layers for their weights instead
    (``need_weights=True``) switches them to the explicit softmax, whose output can differ from the fused one in the
    last bits (measured on CPU with the MHA fast path off: max |diff| 3.6e-5 on ViT-B/32 logits up to 44; equal
    with it on and under bf16 autocast), so the evaluation's metrics would depend on whether attention maps were
    asked for. The maps are those of the very forward that made the logits (on CPU bit for bit the weights
    ``nn.MultiheadAttention`` returns for each block's input); hooks never outlive the call.
    """
    attn_modules = [m for m in unwrap(model).modules() if isinstance(m, nn.MultiheadAttention)]
    if not attn_modules:
        raise UserError(f"{type(unwrap(model)).__name__} has no attention layers: use hpckd.models.cam_features")
    maps: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, kwargs: dict, _out: Any) -> None:
        maps.append(attention_probabilities(module, args, kwargs))  # type: ignore[arg-type]

    handles = [module.register_forward_hook(keep, with_kwargs=True) for module in attn_modules]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return logits, maps


def attention_probabilities(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> torch.Tensor:
    """Per-head attention probabilities (N, heads, L, S) of ``module`` called with ``args`` / ``kwargs``.

    Plain batch-first self-attention (torchvision's ViT blocks): ``softmax(Q K^T / sqrt(d_head))`` from the packed
    input projection, as ``F.multi_head_attention_forward`` forms it (scaled Q, then the product). Any other
    configuration (masks, separate key/value, ``bias_k``, sequence-first) asks the layer's own code for its weights.
    """
    call = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    query, key, value = call["query"], call["key"], call["value"]
    masked = any(call.get(name) is not None for name in ("key_padding_mask", "attn_mask")) or call.get("is_causal")
    plain = (query is key and key is value and query.dim() == 3 and module.batch_first and module._qkv_same_embed_dim
             and module.in_proj_weight is not None and module.bias_k is None and not module.add_zero_attn
             and not masked)
    if not plain:
        # forward() directly: calling the module would run this hook again.
        return module.forward(**{**call, "need_weights": True, "average_attn_weights": False})[1]
    d, heads = module.embed_dim, module.num_heads
    bias = None if module.in_proj_bias is None else module.in_proj_bias[: 2 * d]
    qk = F.linear(query, module.in_proj_weight[: 2 * d], bias)  # (N, L, 2d): Q and K only, V is not needed
    q, k = qk.unflatten(-1, (2, heads, d // heads)).permute(2, 0, 3, 1, 4)  # each (N, heads, L, d_head)
    scores = (q * math.sqrt(1.0 / (d // heads))) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1)


def vit_attentions(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Per-block attention probabilities (N, heads, T, T) of a torchvision ViT; rows sum to 1."""
    return forward_with_attentions(model, x)[1]
