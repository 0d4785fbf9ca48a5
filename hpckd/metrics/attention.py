"""Attention maps and their overlap: CAMs for CNNs, CLS attention / rollout for ViTs, attention IoU.

Attention study (Guo et al.), Sec. 4.1 and Eq. 1:

    IoU = |A_t1 ∩ A_t2| / |A_t1 ∪ A_t2|

- CNNs: the class activation map (Zhou et al. 2016) is the classifier's weights applied as a 1x1 convolution to
  the last convolutional features, ``M_c = sum_k w_{c,k} f_k (+ b_c)``, for the predicted class, the true class,
  or summed over all classes (the study's public code).
- ViTs (Appendix A.7): the CLS token's attention to the patches in the last block, or attention rollout
  (Abnar & Zuidema 2020) through all blocks.
- Each map is min-max normalised per image, upsampled to a common size, and thresholded (0.4 in the study's
  code) into a region; IoU is reported per image (then averaged) and pooled over a batch/split
  (sum of intersections / sum of unions).

Two orders (``form``): ``"paper"`` (the default) normalises at the map's own resolution, upsamples the normalised
map and keeps ``>= threshold``; ``"code"`` follows the attention study's public code (``calculate-IoU.py``):
bilinear upsampling of the *raw* map to the input size first, then ``(m - min) / (max - min + 1e-8)`` per image and
``> threshold``. The code's per-split IoU is ``sum_b n_b IoU_b / sum_b n_b`` with ``IoU_b`` the batch's pooled IoU
(``iou_batch_pooled`` of :class:`IoUAccumulator`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from hpckd.metrics.exact import all_reduce_int64, from_fixed, to_fixed

CamTarget = Literal["predicted", "true", "sum"]
CAM_TARGETS: tuple[str, ...] = ("predicted", "true", "sum")
HeadFusion = Literal["mean", "max", "min"]
IoUForm = Literal["paper", "code"]
IOU_FORMS: tuple[str, ...] = ("paper", "code")
CODE_EPS = 1e-8  # the public code's min-max denominator guard


# --------------------------------------------------------------------------------------------------- CNN CAM
def class_activation_maps(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    target: CamTarget = "predicted",
    labels: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, h, w) class activation maps from (N, K, h, w) features and the (C, K) classifier weight.

    Args:
        features: output of the last convolutional stage (before global average pooling).
        weight, bias: the fully connected classifier (``nn.Linear``); a (C, K, 1, 1) conv weight also works.
        target: ``"predicted"`` (argmax of ``logits``, or of the head applied to pooled features),
            ``"true"`` (needs ``labels``) or ``"sum"`` (all classes summed, the attention study's code).
        logits: the model's logits, used for ``"predicted"`` when given.

    The bias adds a per-image constant, which min-max normalisation removes; it is kept for fidelity to the
    1x1-convolution formulation.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (N, K, h, w), got {tuple(features.shape)}")
    w = weight.reshape(weight.shape[0], -1).to(features.dtype)
    if w.shape[1] != features.shape[1]:
        raise ValueError(f"classifier expects {w.shape[1]} channels, features have {features.shape[1]}")
    b = None if bias is None else bias.to(features.dtype)
    if target == "sum":
        cam = torch.einsum("nkhw,k->nhw", features, w.sum(dim=0))
        return cam if b is None else cam + b.sum()
    if target == "true":
        if labels is None:
            raise ValueError("target='true' needs labels")
        cls = labels.long()
    elif target == "predicted":
        if logits is None:
            logits = features.mean(dim=(2, 3)) @ w.t() + (0 if b is None else b)
        cls = logits.argmax(dim=-1)
    else:
        raise ValueError(f"unknown CAM target {target!r}; choose one of {CAM_TARGETS}")
    cam = torch.einsum("nkhw,nk->nhw", features, w[cls])
    return cam if b is None else cam + b[cls][:, None, None]


# -------------------------------------------------------------------------------------------- ViT attention
def _fuse_heads(attn: torch.Tensor, head_fusion: HeadFusion) -> torch.Tensor:
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention must be (N, heads, T, T), got {tuple(attn.shape)}")
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    if head_fusion == "min":
        return attn.amin(dim=1)
    raise ValueError(f"unknown head fusion {head_fusion!r}; choose mean, max or min")


def _patch_grid(cls_row: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    n, p = cls_row.shape
    if grid is None:
        side = int(round(p**0.5))
        if side * side != p:
            raise ValueError(f"{p} patch tokens do not form a square grid; pass grid=(h, w)")
        grid = (side, side)
    return cls_row.reshape(n, grid[0], grid[1])


def vit_cls_attention(
    attn: torch.Tensor,
    num_prefix_tokens: int = 1,
    head_fusion: HeadFusion = "mean",
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(N, h, w) attention of the CLS token (token 0) to the patch tokens in one block (use the last block).

    ``attn`` is the (N, heads, T, T) softmax attention; the first ``num_prefix_tokens`` tokens (CLS, and
    distillation/register tokens if any) are dropped from the keys.
    """
    fused = _fuse_heads(attn, head_fusion)
    return _patch_grid(fused[:, 0, num_prefix_tokens:], grid)


def attention_rollout(
    attentions: Sequence[torch.Tensor],
    num_prefix_tokens: int = 1,
    head_fusion: HeadFusion = "mean",
    residual: bool = True,
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(N, h, w) attention rollout (Abnar & Zuidema 2020) of the CLS token through all blocks, first to last.

    Per block the heads are fused, the residual connection is modelled as ``0.5 * A + 0.5 * I`` and rows are
    renormalised; the rollout is the product ``A_L ... A_1`` and its CLS row (patch columns) is the map.
    """
    if not attentions:
        raise ValueError("attention_rollout needs at least one block's attention")
    rollout: torch.Tensor | None = None
    for attn in attentions:
        a = _fuse_heads(attn, head_fusion)
        if residual:
            a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    assert rollout is not None
    return _patch_grid(rollout[:, 0, num_prefix_tokens:], grid)


# ---------------------------------------------------------------------------------------------- IoU of maps
def minmax_normalize(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-image min-max normalisation of (N, h, w) maps to [0, 1]; a constant map becomes all zeros."""
    flat = maps.reshape(maps.shape[0], -1).double()
    lo = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - lo
    out = torch.where(span > eps, (flat - lo) / span.clamp(min=eps), torch.zeros_like(flat))
    return out.reshape(maps.shape)


def resize_maps(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize (N, h, w) maps to ``size`` (e.g. the image size) by interpolation; identity if already that size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(maps[:, None].double(), size=tuple(size), mode=mode, **kwargs)[:, 0]


def attention_masks(
    maps: torch.Tensor, threshold: float = 0.4, size: tuple[int, int] | None = None, mode: str = "bilinear"
) -> torch.Tensor:
    """(N, H, W) bool regions: min-max normalise per image, upsample to ``size``, keep values >= ``threshold``."""
    normed = minmax_normalize(maps)
    if size is not None:
        normed = resize_maps(normed, size, mode)
    return normed >= threshold


def code_masks(maps: torch.Tensor, threshold: float, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) bool regions in the attention study's public-code order: bilinearly upsample the raw maps to
    ``size`` (the input size), min-max normalise each image as ``(m - min) / (max - min + 1e-8)``, keep
    ``> threshold``."""
    up = resize_maps(maps.double(), size, "bilinear")
    flat = up.reshape(up.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo + CODE_EPS) > threshold).reshape(up.shape)


def _common_size(a: torch.Tensor, b: torch.Tensor, size: tuple[int, int] | None) -> tuple[int, int]:
    if size is not None:
        return (int(size[0]), int(size[1]))
    # Different resolutions (e.g. ViT-B/32 vs B/16 grids): compare at the larger one.
    return (max(a.shape[-2], b.shape[-2]), max(a.shape[-1], b.shape[-1]))


def intersection_union(
    map_a: torch.Tensor,
    map_b: torch.Tensor,
    threshold: float = 0.4,
    size: tuple[int, int] | None = None,
    mode: str = "bilinear",
    form: IoUForm = "paper",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image pixel counts (int64, (N,)) of the intersection and union of the two thresholded regions
    (``form``: see the module docstring; ``"code"`` needs ``size``, the input size)."""
    if map_a.dim() != 3 or map_b.dim() != 3 or map_a.shape[0] != map_b.shape[0]:
        raise ValueError(f"maps must be (N, h, w) with equal N, got {tuple(map_a.shape)} and {tuple(map_b.shape)}")
    common = _common_size(map_a, map_b, size)
    if form == "paper":
        ma = attention_masks(map_a, threshold, common, mode)
        mb = attention_masks(map_b, threshold, common, mode)
    elif form == "code":
        if size is None:
            raise ValueError("form='code' upsamples to the input size: pass size=(H, W)")
        ma, mb = code_masks(map_a, threshold, common), code_masks(map_b, threshold, common)
    else:
        raise ValueError(f"unknown IoU form {form!r}; choose one of {IOU_FORMS}")
    return (ma & mb).sum(dim=(1, 2)), (ma | mb).sum(dim=(1, 2))


def _per_image_iou(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    # Two empty regions agree perfectly (only possible for constant maps with threshold > 0).
    return torch.where(
        union > 0, inter.double() / union.clamp(min=1).double(), torch.ones_like(inter, dtype=torch.float64)
    )


def attention_iou(
    map_a: torch.Tensor,
    map_b: torch.Tensor,
    threshold: float = 0.4,
    size: tuple[int, int] | None = None,
    reduction: Literal["mean", "pooled", "none"] = "mean",
    mode: str = "bilinear",
    form: IoUForm = "paper",
) -> torch.Tensor | float:
    """IoU of two models' attention regions (attention study Eq. 1).

    Args:
        map_a, map_b: (N, h, w) raw maps (CAMs or ViT attention), possibly of different resolutions.
        threshold: region = normalised map >= threshold (0.4 in the attention study's code).
        size: compare at this (H, W), e.g. the input image size; default: the larger of the two map sizes.
        reduction: ``"mean"`` of per-image IoUs, ``"pooled"`` = sum of intersections / sum of unions over the
            batch (the study's code, per batch), or ``"none"`` for the (N,) per-image IoUs.
        form: ``"paper"`` (normalise, upsample, ``>=``) or ``"code"`` (upsample the raw maps to ``size``, normalise
            with +1e-8, ``>``), see the module docstring.
    """
    inter, union = intersection_union(map_a, map_b, threshold, size, mode, form)
    if reduction == "none":
        return _per_image_iou(inter, union)
    if reduction == "mean":
        return float(_per_image_iou(inter, union).mean())
    if reduction == "pooled":
        total = int(union.sum())
        return float(int(inter.sum()) / total) if total else 1.0
    raise ValueError(f"unknown reduction {reduction!r}; choose mean, pooled or none")


class IoUAccumulator:
    """Streaming, distributed attention IoU over a split (exact int64 sums; rank-invariant except the batch mean).

    ``compute()`` reports ``iou`` (mean of per-image IoUs), ``iou_pooled`` (sum of intersections / sum of unions
    over the split), ``iou_batch_pooled`` (the attention study's code: each ``update`` batch's pooled IoU weighted
    by its number of images, ``sum_b n_b IoU_b / sum_b n_b``; depends on batching) and ``iou_count``.
    ``form``/``size``: see :func:`intersection_union` (``form="code"`` needs the input ``size``).
    """

    def __init__(self, threshold: float = 0.4, size: tuple[int, int] | None = None, mode: str = "bilinear",
                 form: IoUForm = "paper") -> None:
        if form not in IOU_FORMS:
            raise ValueError(f"unknown IoU form {form!r}; choose one of {IOU_FORMS}")
        self.threshold, self.size, self.mode, self.form = threshold, size, mode, form
        self.reset()

    def reset(self) -> None:
        names = ("count", "iou_sum", "inter", "union", "batch_iou_sum", "batches")
        self._state = {n: torch.zeros((), dtype=torch.int64) for n in names}

    def update(self, map_a: torch.Tensor, map_b: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        if valid is not None:
            keep = valid.to(map_a.device).bool()
            map_a, map_b = map_a[keep], map_b[keep.to(map_b.device)]
        if map_a.shape[0] == 0:
            return
        inter, union = intersection_union(map_a, map_b, self.threshold, self.size, self.mode, self.form)
        u_total = int(union.sum())
        batch_iou = int(inter.sum()) / u_total if u_total else 1.0
        adds = {
            "count": torch.tensor(inter.shape[0]),
            "iou_sum": to_fixed(_per_image_iou(inter, union)).sum().cpu(),
            "inter": inter.sum().cpu(),
            "union": union.sum().cpu(),
            "batch_iou_sum": to_fixed(torch.tensor(batch_iou * inter.shape[0], dtype=torch.float64)),
            "batches": torch.tensor(1),
        }
        for name, value in adds.items():
            self._state[name] += value

    def compute(self, group: object | None = None) -> dict[str, float]:
        st = all_reduce_int64(self._state, group)
        n, batches, union = int(st["count"]), int(st["batches"]), int(st["union"])
        nan = float("nan")
        return {
            "iou": float(from_fixed(st["iou_sum"])) / n if n else nan,
            "iou_pooled": (int(st["inter"]) / union if union else 1.0) if n else nan,
            "iou_batch_pooled": float(from_fixed(st["batch_iou_sum"])) / n if batches and n else nan,
            "iou_count": float(n),
        }
