"""timm architectures in the registry; ``hpckd teachers import`` of torchvision, timm and RepDistiller files;
the CIFAR ResNet-50; the CAM warning at 32 px. Imported teachers must give the same logits as the source model."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpckd.checkpoint import load_checkpoint
from hpckd.cli import main
from hpckd.errors import CheckpointError
from hpckd.models import cam_features, count_params, create
from hpckd.models.hooks import CamResolutionWarning
from hpckd.models.weights import apply_state_dict
from hpckd.teachers.importer import import_teacher
from tests.helpers import assert_one_line_error, run_hpckd


def teacher_logits(path, x):
    """Logits of an imported teacher, rebuilt the way hpckd's teacher serving builds one."""
    state = load_checkpoint(path)
    model = create(state["arch"], state["num_classes"], **state["arch_kwargs"]).eval()
    apply_state_dict(model, state["model"], str(path))
    with torch.no_grad():
        return model(x)


def test_torchvision_state_dict_imports_with_the_same_logits(tmp_path):
    import torchvision

    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=5).eval()
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    out = import_teacher(tmp_path / "r18.pth", "resnet18", 5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(teacher_logits(out, x), source(x))
    meta = load_checkpoint(out)["meta"]
    assert meta["source_format"] == "native" and len(meta["source_sha256"]) == 64


@pytest.mark.parametrize("name", ["resnet18d", "mobilenetv3_small_100"])
def test_timm_state_dict_imports_with_the_same_logits(tmp_path, name):
    import timm  # a declared dependency (setup.py)

    torch.manual_seed(1)
    source = timm.create_model(name, pretrained=False, num_classes=7).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "t.pth")
    out = import_teacher(tmp_path / "t.pth", name, 7, tmp_path / "teacher.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(teacher_logits(out, x), source(x), atol=1e-6)


def test_timm_archs_are_registered_and_build_without_downloading():
    for name, params in (("resnet18d", 11.69e6), ("resnet34d", 21.82e6), ("skresnet18", 11.96e6),
                         ("mobilenetv3_large_100", 5.48e6), ("mobilenetv1_100", 4.23e6)):
        # published parameter counts at 1000 classes (timm's model cards)
        assert abs(count_params(create(name, 1000)) - params) / params < 0.01, name


class RepDistillerBlock(nn.Module):
    """RepDistiller's CIFAR BasicBlock, written from its published structure (conv-bn-relu-conv-bn + downsample)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class RepDistillerResNet(nn.Module):
    """RepDistiller's ``resnet8x4`` / ``resnet20`` naming: conv1, bn1, layer1..3 (blocks), fc."""

    def __init__(self, depth, filters, num_classes):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = filters[0]
        self.conv1 = nn.Conv2d(3, filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.layer1 = self._layer(filters[1], n, 1)
        self.layer2 = self._layer(filters[2], n, 2)
        self.layer3 = self._layer(filters[3], n, 2)
        self.fc = nn.Linear(filters[3], num_classes)

    def _layer(self, planes, blocks, stride):
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [RepDistillerBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [RepDistillerBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.avg_pool2d(x, 8).flatten(1))


@pytest.mark.parametrize("arch, depth, filters", [("resnet8x4", 8, (32, 64, 128, 256)), ("resnet20", 20, (16, 16, 32, 64))])
def test_repdistiller_cifar_teacher_imports_with_the_same_logits(tmp_path, arch, depth, filters):
    torch.manual_seed(2)
    source = RepDistillerResNet(depth, filters, 100)
    for m in source.modules():  # non-trivial BN statistics, so a wrong mapping changes the logits
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    source.eval()
    torch.save({"epoch": 240, "model": source.state_dict(), "accuracy": 73.1}, tmp_path / "ckpt_epoch_240.pth")
    out = import_teacher(tmp_path / "ckpt_epoch_240.pth", arch, 100)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher_logits(out, x), source(x), atol=1e-5)
    meta = load_checkpoint(out)["meta"]
    assert meta["source_format"] == "repdistiller" and meta["source_accuracy"] == pytest.approx(73.1)


class RepDistillerWideBlock(nn.Module):
    """RepDistiller's WRN block: bn1-relu (shared by the shortcut when the widths differ), conv1, bn2-relu, conv2."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal = in_planes == out_planes
        self.convShortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.equal else self.convShortcut(act))


class RepDistillerWRN(nn.Module):
    """RepDistiller's naming: conv1, block{1,2,3}.layer.{i}, bn1 (final), fc."""

    def __init__(self, depth, widen, num_classes):
        super().__init__()
        n, widths = (depth - 4) // 6, (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        for s in range(3):
            block = nn.Module()
            block.layer = nn.Sequential(*[RepDistillerWideBlock(widths[s] if i == 0 else widths[s + 1], widths[s + 1],
                                                                (1 if s == 0 else 2) if i == 0 else 1) for i in range(n)])
            setattr(self, f"block{s + 1}", block)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        x = self.conv1(x)
        for s in range(1, 4):
            x = getattr(self, f"block{s}").layer(x)
        return self.fc(F.avg_pool2d(F.relu(self.bn1(x)), 8).flatten(1))


class RepDistillerVGG8(nn.Module):
    """RepDistiller's vgg8_bn naming: block0..4 (conv, bn[, relu]; the last ReLU dropped), classifier."""

    def __init__(self, num_classes):
        super().__init__()
        widths, in_ch = (64, 128, 256, 512, 512), 3
        for s, w in enumerate(widths):
            setattr(self, f"block{s}", nn.Sequential(nn.Conv2d(in_ch, w, 3, padding=1), nn.BatchNorm2d(w)))
            in_ch = w
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        for s in range(5):
            x = F.relu(getattr(self, f"block{s}")(x))
            if s < 3:  # pool0..pool2; pool3 only at 64 px; pool4 is the global average
                x = F.max_pool2d(x, 2)
        return self.classifier(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("arch, build", [("wrn_16_2", lambda: RepDistillerWRN(16, 2, 10)),
                                         ("vgg8", lambda: RepDistillerVGG8(10))])
def test_repdistiller_wrn_and_vgg_import_with_the_same_logits(tmp_path, arch, build):
    torch.manual_seed(3)
    source = build()
    for m in source.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    source.eval()
    torch.save({"model": source.state_dict()}, tmp_path / "teacher.pth")
    out = import_teacher(tmp_path / "teacher.pth", arch, 10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher_logits(out, x), source(x), atol=1e-4)


@pytest.mark.slow  # one fresh `hpckd` process
def test_a_mismatched_file_is_one_line_naming_the_first_key(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pth")
    proc = run_hpckd("teachers", "import", str(tmp_path / "r18.pth"), "--arch", "resnet18", "--classes", "100")
    assert_one_line_error(proc, "first mismatched key 'fc.weight'", "(10, 512) vs model (100, 512)")
    # in-process from here (one subprocess above shows the user's view)
    with pytest.raises(CheckpointError, match=r"does not fit resnet34: first mismatched key 'layer1\.2\.conv1\.weight'"):
        import_teacher(tmp_path / "r18.pth", "resnet34", 10, tmp_path / "t.pt")
    assert not (tmp_path / "t.pt").exists()
    assert main(["teachers", "import", str(tmp_path / "r18.pth"), "--arch", "resnet18", "--classes", "10",
                 "--out", str(tmp_path / "t.pt")]) == 0
    assert (tmp_path / "t.pt").is_file()


def test_cifar_resnet50_matches_the_crd_network():
    model = create("resnet50_cifar", 100).eval()
    assert abs(count_params(model) - 23.71e6) < 0.01e6  # CRD's ResNet50 at 100 classes
    x = torch.randn(2, 3, 32, 32)
    feats, weight, bias = cam_features(model, x)
    assert feats.shape == (2, 2048, 4, 4)
    with torch.no_grad():
        assert torch.allclose(model(x), feats.mean(dim=(2, 3)) @ weight.T + bias, atol=1e-5)


def test_cam_of_an_imagenet_resnet_at_32_px_warns_naming_the_image_size():
    model = create("resnet50", 10).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            feats, _, _ = cam_features(model, torch.randn(2, 3, 32, 32))
    assert feats.shape[-2:] == (1, 1)
    messages = [str(w.message) for w in caught if issubclass(w.category, CamResolutionWarning)]
    assert len(messages) == 1 and "data.image_size=32" in messages[0] and ">= 224" in messages[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            cam_features(create("resnet20", 10).eval(), torch.randn(2, 3, 32, 32))
    assert not [w for w in caught if issubclass(w.category, CamResolutionWarning)]
