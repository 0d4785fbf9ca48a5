"""Attention maps (CAM, ViT CLS attention, rollout) and attention IoU against numpy and hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hpckd.metrics import (
    IoUAccumulator,
    attention_iou,
    attention_rollout,
    class_activation_maps,
    minmax_normalize,
    vit_cls_attention,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def np_cam(feat: np.ndarray, w: np.ndarray, b: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """M_c(x, y) = sum_k w_ck f_k(x, y) + b_c, per image for its class (Zhou et al. 2016)."""
    return np.stack([np.tensordot(w[c], f, axes=(0, 0)) + b[c] for f, c in zip(feat, cls)])


# ------------------------------------------------------------------------------------------------------ CAM
def test_cam_targets_against_numpy(rng: np.random.Generator) -> None:
    feat = rng.normal(size=(5, 8, 4, 4))
    w, b = rng.normal(size=(6, 8)), rng.normal(size=6)
    labels = rng.integers(0, 6, size=5)
    head_logits = feat.mean(axis=(2, 3)) @ w.T + b  # GAP + FC, the network's own prediction
    pred = head_logits.argmax(1)
    got_pred = class_activation_maps(_t(feat), _t(w), _t(b), target="predicted")
    got_true = class_activation_maps(_t(feat), _t(w), _t(b), target="true", labels=_t(labels))
    got_sum = class_activation_maps(_t(feat), _t(w), _t(b), target="sum")
    np.testing.assert_allclose(got_pred.numpy(), np_cam(feat, w, b, pred), rtol=1e-12)
    np.testing.assert_allclose(got_true.numpy(), np_cam(feat, w, b, labels), rtol=1e-12)
    summed = sum(np_cam(feat, w, b, np.full(5, c)) for c in range(6))
    np.testing.assert_allclose(got_sum.numpy(), summed, rtol=1e-10, atol=1e-12)
    # explicit logits decide the predicted class
    forced = np.zeros((5, 6))
    forced[:, 2] = 1.0
    got_forced = class_activation_maps(_t(feat), _t(w), _t(b), target="predicted", logits=_t(forced))
    np.testing.assert_allclose(got_forced.numpy(), np_cam(feat, w, b, np.full(5, 2)), rtol=1e-12)
    with pytest.raises(ValueError):
        class_activation_maps(_t(feat), _t(w), target="true")


def test_cam_equals_1x1_convolution_of_a_real_head() -> None:
    torch.manual_seed(0)
    feat = torch.randn(3, 16, 5, 5)
    fc = nn.Linear(16, 10)
    conv = nn.Conv2d(16, 10, kernel_size=1)
    conv.weight.data = fc.weight.data[:, :, None, None].clone()
    conv.bias.data = fc.bias.data.clone()
    maps = conv(feat)  # the attention study's "new convolution layer" from the FC weights
    logits = fc(feat.mean(dim=(2, 3)))
    cam = class_activation_maps(feat, fc.weight, fc.bias, target="predicted", logits=logits)
    expected = maps[torch.arange(3), logits.argmax(1)]
    torch.testing.assert_close(cam, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- ViT attention
def _random_attention(rng: np.random.Generator, n: int, heads: int, tokens: int) -> np.ndarray:
    a = rng.random(size=(n, heads, tokens, tokens))
    return a / a.sum(axis=-1, keepdims=True)


def test_vit_cls_attention_against_numpy(rng: np.random.Generator) -> None:
    attn = _random_attention(rng, 2, 3, 1 + 16)
    got = vit_cls_attention(_t(attn))
    np.testing.assert_allclose(got.numpy(), attn.mean(axis=1)[:, 0, 1:].reshape(2, 4, 4), rtol=1e-12)
    got_max = vit_cls_attention(_t(attn), head_fusion="max")
    np.testing.assert_allclose(got_max.numpy(), attn.max(axis=1)[:, 0, 1:].reshape(2, 4, 4), rtol=1e-12)
    # two prefix tokens (CLS + distillation token), rectangular grid
    attn2 = _random_attention(rng, 1, 2, 2 + 6)
    got2 = vit_cls_attention(_t(attn2), num_prefix_tokens=2, grid=(2, 3))
    np.testing.assert_allclose(got2.numpy(), attn2.mean(axis=1)[:, 0, 2:].reshape(1, 2, 3), rtol=1e-12)


def test_attention_rollout_against_numpy(rng: np.random.Generator) -> None:
    blocks = [_random_attention(rng, 2, 4, 10) for _ in range(3)]  # 1 CLS + 9 patches
    rollout = np.stack([np.eye(10)] * 2)
    for a in blocks:
        fused = 0.5 * a.mean(axis=1) + 0.5 * np.eye(10)
        fused = fused / fused.sum(axis=-1, keepdims=True)
        rollout = fused @ rollout
    got = attention_rollout([_t(a) for a in blocks])
    np.testing.assert_allclose(got.numpy(), rollout[:, 0, 1:].reshape(2, 3, 3), rtol=1e-10)
    # one block without the residual term is the plain CLS attention
    np.testing.assert_allclose(
        attention_rollout([_t(blocks[0])], residual=False).numpy(), vit_cls_attention(_t(blocks[0])).numpy(), rtol=1e-12
    )


# ---------------------------------------------------------------------------------------------------- IoU
def test_iou_identical_is_one_and_disjoint_is_zero(rng: np.random.Generator) -> None:
    maps = _t(rng.normal(size=(4, 7, 7)))
    assert attention_iou(maps, maps) == 1.0
    assert attention_iou(maps, maps, reduction="pooled") == 1.0
    left = torch.zeros(2, 4, 4)
    left[:, :, :2] = 1.0
    right = torch.zeros(2, 4, 4)
    right[:, :, 2:] = 1.0
    assert attention_iou(left, right) == 0.0
    assert attention_iou(left, right, reduction="pooled") == 0.0


def test_iou_hand_made_mean_vs_pooled_and_threshold() -> None:
    a = torch.zeros(2, 4, 4)
    b = torch.zeros(2, 4, 4)
    a[0, 0, :4] = 1.0  # image 0: a = 4 pixels of row 0, b = row 0 cols 2-3 and row 1 (6 pixels) -> 2 / 8
    b[0, 0, 2:] = 1.0
    b[0, 1, :] = 1.0
    a[1, :2, :2] = 1.0  # image 1: identical 4-pixel squares -> 4 / 4
    b[1, :2, :2] = 1.0
    per_image = attention_iou(a, b, reduction="none")
    np.testing.assert_allclose(per_image.numpy(), [2 / 8, 1.0])
    assert attention_iou(a, b) == pytest.approx((2 / 8 + 1.0) / 2)
    assert attention_iou(a, b, reduction="pooled") == pytest.approx((2 + 4) / (8 + 4))
    # graded map: values 0, 0.3, 0.6, 1 in a row; threshold 0.4 keeps 2 pixels, 0.2 keeps 3
    g = torch.tensor([[[0.0, 0.3, 0.6, 1.0]]])
    h = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    assert attention_iou(g, h, threshold=0.4) == 1.0
    assert attention_iou(g, h, threshold=0.2) == pytest.approx(2 / 3)
    # a value exactly at the threshold is inside the region (normalised map >= threshold)
    edge = torch.tensor([[[0.0, 0.4, 1.0]]], dtype=torch.float64)
    assert attention_iou(edge, torch.tensor([[[0.0, 1.0, 1.0]]]), threshold=0.4) == 1.0


def test_iou_normalises_per_image_and_upsamples() -> None:
    # min-max normalisation: a shifted and scaled map has the same region
    base = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    assert attention_iou(base, 10 * base + 5) == 1.0
    # a 2x2 map against a 4x4 map at the image size (nearest upsampling: each cell -> a 2x2 block)
    coarse = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    fine = torch.zeros(1, 4, 4)
    fine[0, :2, :] = 1.0  # top half: 8 pixels; coarse top-left block: 4 pixels -> IoU 4/8
    assert attention_iou(coarse, fine, mode="nearest") == pytest.approx(0.5)
    assert attention_iou(coarse, fine, size=(8, 8), mode="nearest") == pytest.approx(0.5)
    normed = minmax_normalize(torch.tensor([[[2.0, 4.0], [6.0, 10.0]]]))
    np.testing.assert_allclose(normed.numpy(), [[[0.0, 0.25], [0.5, 1.0]]])


def test_iou_accumulator_streams_the_same_values(rng: np.random.Generator) -> None:
    a = _t(rng.normal(size=(10, 6, 6)))
    b = _t(rng.normal(size=(10, 6, 6)))
    acc = IoUAccumulator()
    acc.update(a[:3], b[:3])
    acc.update(a[3:], b[3:])
    # padding rows marked invalid never count
    acc.update(_t(rng.normal(size=(2, 6, 6))), _t(rng.normal(size=(2, 6, 6))), valid=torch.tensor([False, False]))
    out = acc.compute()
    assert out["iou_count"] == 10
    assert out["iou"] == pytest.approx(attention_iou(a, b), abs=2**-28)
    assert out["iou_pooled"] == pytest.approx(attention_iou(a, b, reduction="pooled"), rel=1e-12)
    # the attention study's code: per-batch pooled IoUs weighted by batch size (3 and 7 images)
    batch_mean = (3 * attention_iou(a[:3], b[:3], reduction="pooled") + 7 * attention_iou(a[3:], b[3:], reduction="pooled")) / 10
    assert out["iou_batch_pooled"] == pytest.approx(batch_mean, abs=2**-28)  # fixed-point resolution
