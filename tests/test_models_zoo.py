"""Model zoo: every registered model builds and forwards once at its native size; sizes match published values;
the CAM hook reproduces the logits; the fidelity study's pre-activation ResNets behave as the paper needs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hpckd.errors import ConfigError, UserError
from hpckd.models import (
    available,
    cam_features,
    count_params,
    create,
    forward_with_attentions,
    linear_head,
    spec,
    vit_attentions,
)

# Published parameter counts in millions at the classes the tables use (CIFAR-100, ImageNet-1k).
# ImageNet: torchvision's model tables; ResNet-18/34/50 and MobileNet V2 also in the response-based study, Tab. 2.
# CIFAR: the CRD benchmark tables (Tian et al. 2020) that the augmentation study's pairs come from.
PUBLISHED_PARAMS_M = {
    "resnet18": 11.69, "resnet34": 21.80, "resnet50": 25.56, "resnet101": 44.55, "vgg16_bn": 138.37,
    "vgg19_bn": 143.68, "mobilenet_v2": 3.50, "vit_b_16": 86.57, "vit_b_32": 88.22,
    "resnet8": 0.08, "resnet20": 0.28, "resnet32": 0.47, "resnet56": 0.86, "resnet110": 1.74, "resnet8x4": 1.23,
    "resnet32x4": 7.43, "wrn_16_2": 0.70, "wrn_40_1": 0.57, "wrn_40_2": 2.26, "vgg8": 3.96, "vgg13": 9.46,
    "mobilenetv2_cifar": 0.81, "shufflenetv1_cifar": 0.95, "shufflenetv2_cifar": 1.36,
}
ISSUE_MODELS = {
    "resnet18", "resnet34", "resnet50", "resnet101", "vgg16_bn", "vgg19_bn", "mobilenet_v2", "vit_b_16", "vit_b_32",
    "resnet20", "resnet32", "resnet56", "resnet110", "resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_2", "vgg8",
    "vgg13", "mobilenetv2_cifar", "shufflenetv1_cifar", "shufflenetv2_cifar", "preresnet20", "preresnet56",
    "preresnet110",
}


def _classes(name: str) -> int:
    return 100 if spec(name).family == "cifar" else 1000


def test_registry_lists_every_model_the_studies_use():
    assert ISSUE_MODELS <= set(available())
    assert set(PUBLISHED_PARAMS_M) <= set(available())


# Spatial size of the last feature map at 32 px, as in the reference implementations (CRD, the fidelity study).
CIFAR_MAP_SIZE = {"vgg": 4, "shufflenet": 4, "mobilenetv2_cifar": 2, "resnet50_cifar": 4}
# CAM identity checked on every CIFAR CNN and two ImageNet CNNs (the other torchvision ResNets share the adapter;
# a second trunk pass of ResNet-101 at 224 px would only cost CPU time).
IMAGENET_CAM = {"resnet18", "mobilenet_v2"}


def _map_size(name: str) -> int:
    return next((size for prefix, size in CIFAR_MAP_SIZE.items() if name.startswith(prefix)), 8)


@pytest.mark.parametrize("name", sorted(available()))
def test_builds_and_forwards_at_native_size(name):
    """One forward per model at its native size; CNNs also check that CAMs are W @ A, i.e. that
    logits = W @ mean_hw(A) + b (Zhou et al. 2016), ViTs that the attention maps are row-stochastic."""
    torch.manual_seed(0)
    model = create(name, 7).eval()
    family, kind, size = spec(name).family, spec(name).kind, spec(name).input_size
    assert size == (32 if family == "cifar" else 224)
    x = torch.randn(2 if family == "cifar" else 1, 3, size, size)
    with torch.no_grad():
        if kind == "vit":  # one forward gives the logits and the attention maps (ViT-B at 224 px is slow on CPU)
            out, maps = forward_with_attentions(model, x)
            tokens = 1 + (size // int(name[-2:])) ** 2
            assert len(maps) == 12 and maps[0].shape == (1, 12, tokens, tokens)
            assert torch.allclose(maps[-1].sum(-1), torch.ones(1, 12, tokens), atol=1e-5)
        elif family == "cifar" or name in IMAGENET_CAM:
            feats, weight, bias = cam_features(model, x)
            out = model(x)
            assert feats.shape[:2] == (x.shape[0], weight.shape[1]) and weight.shape[0] == 7
            if family == "cifar":
                assert feats.shape[-2:] == (_map_size(name), _map_size(name))
            rebuilt = feats.mean(dim=(2, 3)) @ weight.T + (0 if bias is None else bias)
            torch.testing.assert_close(rebuilt, out, rtol=1e-4, atol=1e-5)
        else:
            out = model(x)
    assert out.shape == (x.shape[0], 7) and torch.isfinite(out).all()
    assert linear_head(model)[1].out_features == 7


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_parameter_count_matches_published(name):
    with torch.device("meta"):  # counting needs shapes only
        model = create(name, _classes(name))
    published = PUBLISHED_PARAMS_M[name] * 1e6
    # tables round to 0.01M: allow half a unit of that rounding, or 1% for the smallest nets
    assert abs(count_params(model) - published) <= max(0.005e6, 0.01 * published), count_params(model)


def test_count_params_counts_shared_parameters_once_and_can_skip_frozen():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    net[2].requires_grad_(False)
    assert count_params(net) == (4 * 3 + 3) + (3 * 2 + 2)
    assert count_params(net, trainable_only=True) == 4 * 3 + 3
    tied = nn.Sequential(net[0], net[0])
    assert count_params(tied) == 15


def test_cam_hooks_refuse_models_without_a_linear_head_with_one_clear_error():
    with pytest.raises(UserError, match="MLP"), torch.device("meta"):
        cam_features(create("vgg16_bn", 10), torch.empty(1, 3, 224, 224, device="meta"))
    with pytest.raises(UserError, match="vit_attentions"), torch.device("meta"):
        cam_features(create("vit_b_32", 10), torch.empty(1, 3, 224, 224, device="meta"))
    with pytest.raises(UserError, match="attention"):
        vit_attentions(create("resnet8", 3), torch.randn(1, 3, 32, 32))


def test_cam_features_see_through_ddp_style_and_compile_style_wrappers():
    model = create("resnet8", 4).eval()

    class DDPLike(nn.Module):  # DistributedDataParallel / DeepSpeed keep the model as .module
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    class CompiledLike(nn.Module):  # torch.compile keeps it as ._orig_mod
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain, _, _ = cam_features(model, x)
        for wrapped in (DDPLike(model), CompiledLike(DDPLike(model))):
            feats, weight, _ = cam_features(wrapped, x)
            assert torch.equal(feats, plain) and weight is model.fc.weight


def test_unknown_model_names_suggest_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'resnet56'"):
        create("resnet65", 10)
    with pytest.raises(ConfigError, match="norm must be one of bn, ln"):
        create("preresnet20", 10, norm="gn")


# ---------------------------------------------------------------------------------------------------- preact
def _preact_params(depth: int, bottleneck: bool, classes: int = 100, norm_params: int = 2) -> int:
    """Parameter count of a 16/32/64 pre-activation ResNet from the architecture's arithmetic."""
    n = (depth - 2) // (9 if bottleneck else 6)
    total, in_ch = 3 * 16 * 9, 16
    for stage, planes in enumerate((16, 32, 64)):
        for i in range(n):
            stride = 2 if (stage > 0 and i == 0) else 1
            if bottleneck:
                out = 4 * planes
                body = (norm_params * in_ch + in_ch * planes + norm_params * planes + 9 * planes * planes
                        + norm_params * planes + planes * out)
            else:
                out = planes
                body = norm_params * in_ch + 9 * in_ch * planes + norm_params * planes + 9 * planes * planes
            shortcut = in_ch * out if (stride != 1 or in_ch != out) else 0
            total += body + shortcut
            in_ch = out
    return total + norm_params * in_ch + in_ch * classes + classes


@pytest.mark.parametrize("depth", [20, 56, 110])
@pytest.mark.parametrize("block", ["auto", "basic"])
def test_preact_resnet_sizes_follow_the_paper_and_the_public_code(depth, block):
    """Paper text: basic blocks at every depth; public code: bottlenecks (4x) from depth 44 (``block="auto"``)."""
    bottleneck = block == "auto" and depth >= 44
    with torch.device("meta"):
        model = create(f"preresnet{depth}", 100, block=block)
    assert count_params(model) == _preact_params(depth, bottleneck)
    if block == "basic":  # He et al. 2016, Tab. 6: 0.27M / 0.85M / 1.7M (their shortcuts have no parameters)
        assert math.isclose(count_params(model) / 1e6, {20: 0.27, 56: 0.85, 110: 1.7}[depth], rel_tol=0.035)
    assert model.fc.in_features == (256 if bottleneck else 64)


def test_preact_layernorm_variant_keeps_no_statistics_and_is_batch_independent():
    """Fidelity study Sec. 5.2: with LayerNorm a sample's prediction depends on the weights only, not on
    accumulated statistics or on the other samples in the batch."""
    torch.manual_seed(0)
    ln = create("preresnet20_ln", 10)
    assert not list(ln.buffers())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ln.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ln.train()
        together, alone = ln(x)[:1], ln(x[:1])
        ln.eval()
        evaluated = ln(x[:1])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone, evaluated, rtol=0, atol=0)
    bn = create("preresnet20", 10).train()  # contrast: BatchNorm mixes the batch in training mode
    with torch.no_grad():
        assert not torch.allclose(bn(x)[:1], bn(x[:1]), atol=1e-4)


def test_preact_layernorm_normalises_each_sample_over_channels_and_space():
    ln = create("preresnet20", 10, norm="ln")
    norm = ln.layers[0].norm1
    x = torch.randn(2, 16, 5, 5) * 3 + 1
    y = norm(x).detach().numpy()
    ref = x.numpy()
    mean = ref.reshape(2, -1).mean(1)[:, None, None, None]
    var = ref.reshape(2, -1).var(1)[:, None, None, None]
    torch.testing.assert_close(torch.from_numpy(y), torch.from_numpy((ref - mean) / (var + 1e-5) ** 0.5),
                               rtol=1e-4, atol=1e-5)


def test_fidelity_study_vgg16_variant_has_no_batchnorm_and_an_mlp_head():
    """Stanton et al. App. B.1: VGG-16 without batch normalisation (torchvision-style MLP head)."""
    model = create("vgg16", 100, bn=False, head="mlp")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 512), (512, 100)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(UserError):
        cam_features(model, torch.randn(1, 3, 32, 32))
