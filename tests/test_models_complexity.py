"""MAC counting against hand arithmetic and published tables; the rows `hpckd models` prints."""

from __future__ import annotations

import torch
from torch import nn

from hpckd.models import count_macs, count_params, create, describe_models, format_table

# Published forward MACs (millions) at 224 px. ResNet-18/34/50 and MobileNet V2: the response-based study,
# Song et al. 2023, Tab. 2 ("FLOPs (M)" counted as multiply-adds); the others: torchvision's model tables
# ("GFLOPS", also multiply-adds). The issue quotes 1.82 G / 4.11 G for ResNet-18 / ResNet-50, which agree to 0.6%.
PUBLISHED_MMACS = {
    "resnet18": 1814.1, "resnet34": 3663.8, "resnet50": 4089.2, "mobilenet_v2": 300.8, "resnet101": 7800,
    "vgg16_bn": 15470, "vgg19_bn": 19630, "vit_b_16": 17560, "vit_b_32": 4410,
}


def test_published_imagenet_sizes_and_macs():
    rows = {r.name: r for r in describe_models(sorted(PUBLISHED_MMACS))}
    for name, mmacs in PUBLISHED_MMACS.items():
        row = rows[name]
        assert (row.input_size, row.num_classes, row.family) == (224, 1000, "imagenet")
        # tables give 4-5 significant digits: agree to within their rounding (0.1%)
        assert abs(row.macs / 1e6 - mmacs) <= 0.001 * mmacs, (name, row.macs)
    assert abs(rows["resnet18"].params - 11.69e6) < 0.005e6 and abs(rows["resnet50"].params - 25.56e6) < 0.005e6
    assert abs(rows["resnet18"].macs - 1.82e9) / 1.82e9 < 0.006 and abs(rows["resnet50"].macs - 4.11e9) / 4.11e9 < 0.006


def _resnet20_macs(classes: int = 100) -> int:
    """CIFAR ResNet-20 (CRD layout, 1x1 projection shortcuts) by hand: conv MACs = Cout*Cin*k*k*H*W."""
    macs = 16 * 3 * 9 * 32 * 32  # stem
    for stage, (c_in, c, hw) in enumerate(((16, 16, 32), (16, 32, 16), (32, 64, 8))):
        macs += c * c_in * 9 * hw * hw + c * c * 9 * hw * hw  # first block
        if stage > 0:
            macs += c * c_in * hw * hw  # projection shortcut
        macs += 2 * (2 * c * c * 9 * hw * hw)  # two more blocks
    return macs + 64 * classes


def _resnet18_macs(size: int = 224, classes: int = 1000) -> int:
    """torchvision ResNet-18 by hand: 7x7/2 stem, 3x3/2 max-pool, four stages of two basic blocks."""
    hw = size // 2
    macs = 64 * 3 * 49 * hw * hw
    hw //= 2
    macs += 4 * 64 * 64 * 9 * hw * hw  # layer1
    c_in = 64
    for c in (128, 256, 512):
        hw //= 2
        macs += c * c_in * 9 * hw * hw + 3 * c * c * 9 * hw * hw + c * c_in * hw * hw  # strided conv, 3 convs, 1x1
        c_in = c
    return macs + 512 * classes


def test_resnet18_macs_match_hand_arithmetic():
    assert describe_models(["resnet18"])[0].macs == _resnet18_macs() == 1_814_073_344


def test_cifar_resnet20_macs_match_hand_arithmetic():
    rows = describe_models(["resnet20", "wrn_40_2"])
    assert rows[0].macs == _resnet20_macs() and rows[0].input_size == 32 and rows[0].num_classes == 100
    assert abs(rows[0].macs / 1e6 - 41) < 0.5  # the commonly quoted 41M
    assert abs(rows[1].macs / 1e6 - 328) < 1.0  # WRN-40-2, CRD-benchmark tables: 0.33 GMACs


class _Mixed(nn.Module):
    """Grouped + depthwise convs, a linear layer over tokens and multi-head self-attention."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1, groups=3)
        self.dw = nn.Conv2d(12, 12, 3, stride=2, padding=1, groups=12)
        self.attn = nn.MultiheadAttention(12, num_heads=3, batch_first=True)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(self.conv(x))  # (N, 12, 4, 4)
        tokens = x.flatten(2).transpose(1, 2)  # (N, 16, 12)
        tokens, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return self.fc(tokens).mean(1)


def test_count_macs_matches_hand_arithmetic_for_convs_linears_and_attention():
    n, t, e = 2, 16, 12
    conv = 12 * (3 // 3) * 9 * 8 * 8  # Cout * Cin/groups * k*k * Hout*Wout
    dw = 12 * 1 * 9 * 4 * 4
    attn = t * e * 3 * e + 2 * t * t * e + t * e * e  # qkv projection, QK^T and AV, output projection
    fc = t * e * 5
    assert count_macs(_Mixed(), 8, batch=n) == n * (conv + dw + attn + fc)
    assert count_macs(_Mixed(), (8, 8)) == conv + dw + attn + fc


def test_count_macs_leaves_the_model_untouched():
    model = create("resnet8", 10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, 32)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics and num_batches_tracked too
    assert model.training and next(model.parameters()).device.type == "cpu"


def test_describe_models_defaults_and_overrides():
    (row,) = describe_models(["resnet18"], num_classes=10, input_size=448)
    assert (row.num_classes, row.input_size) == (10, 448)
    assert row.params == 11_689_512 - 513 * (1000 - 10)  # only the classifier shrinks
    assert row.macs == _resnet18_macs(448, 10)
    assert row.as_dict()["name"] == "resnet18"


def test_format_table_prints_one_line_per_model():
    rows = describe_models(["resnet18", "resnet20"])
    lines = format_table(rows).splitlines()
    assert len(lines) == 4 and lines[0].split()[:2] == ["model", "family"]
    assert lines[2].split() == ["resnet18", "imagenet", "224", "1000", "11.69", "1.814"]
    assert lines[3].split()[:5] == ["resnet20", "cifar", "32", "100", "0.28"]


def test_count_params_on_a_real_model_matches_meta():
    with torch.device("meta"):
        meta = create("resnet20", 100)
    assert count_params(create("resnet20", 100)) == count_params(meta) == 278_324
