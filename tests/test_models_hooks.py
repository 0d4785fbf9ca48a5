"""ViT attention hook: maps equal softmax(QK^T / sqrt(d)) computed independently in numpy; nothing leaks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from hpckd.models import forward_with_attentions, vit_attentions


def _tiny_vit() -> torchvision.models.VisionTransformer:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    ).eval()


def _layer_norm(x: np.ndarray, ln: nn.LayerNorm) -> np.ndarray:
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + ln.eps) * ln.weight.detach().numpy() + ln.bias.detach().numpy()


def test_first_block_attention_matches_numpy_softmax_qk():
    vit = _tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    maps = vit_attentions(vit, x)
    assert len(maps) == 2 and maps[0].shape == (3, 2, 17, 17)  # 1 class token + (32/8)^2 patches
    # Independent computation of block 0 from the weights.
    with torch.no_grad():
        patches = vit.conv_proj(x).flatten(2).transpose(1, 2).numpy()  # (N, 16, 16)
    cls = vit.class_token.detach().numpy().repeat(3, axis=0)
    tokens = np.concatenate([cls, patches], axis=1) + vit.encoder.pos_embedding.detach().numpy()
    block = vit.encoder.layers[0]
    h = _layer_norm(tokens, block.ln_1)
    w = block.self_attention.in_proj_weight.detach().numpy()
    b = block.self_attention.in_proj_bias.detach().numpy()
    q, k = h @ w[:16].T + b[:16], h @ w[16:32].T + b[16:32]
    heads = []
    for i in range(2):
        qi, ki = q[..., 8 * i : 8 * (i + 1)], k[..., 8 * i : 8 * (i + 1)]
        scores = qi @ ki.transpose(0, 2, 1) / np.sqrt(8)
        e = np.exp(scores - scores.max(-1, keepdims=True))
        heads.append(e / e.sum(-1, keepdims=True))
    expected = np.stack(heads, axis=1)
    np.testing.assert_allclose(maps[0].detach().numpy(), expected, rtol=1e-4, atol=1e-6)


def test_hooks_do_not_change_logits_and_do_not_leak():
    vit = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = vit(x)
        logits, maps = forward_with_attentions(vit, x)
        again = vit(x)
    torch.testing.assert_close(logits, plain, rtol=1e-4, atol=1e-5)
    assert torch.equal(again, plain)
    for m in vit.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert all(torch.allclose(a.sum(-1), torch.ones(2, 2, 17), atol=1e-5) for a in maps)


def test_hooks_are_removed_even_when_the_forward_fails():
    vit = _tiny_vit()
    with pytest.raises((AssertionError, RuntimeError)):
        vit_attentions(vit, torch.randn(1, 3, 16, 16))  # wrong image size: torchvision raises mid-forward
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in vit.modules())
