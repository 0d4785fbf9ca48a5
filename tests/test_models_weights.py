"""load_weights: local torchvision state dicts and hpckd checkpoints load exactly; every mismatch is one clear error."""

from __future__ import annotations

import pytest
import torch

from hpckd.errors import CheckpointError
from hpckd.models import create, load_weights
from hpckd.checkpoint import save_checkpoint


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _trained_like(name: str, classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create(name, classes)
    for m in model.modules():  # non-trivial BN statistics, so buffers are checked as well
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model


def test_torchvision_state_dict_file_loads_exactly(tmp_path):
    source = _trained_like("resnet18", 10, seed=1)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    target = _trained_like("resnet18", 10, seed=2)
    assert not _same_state(source, target)
    assert load_weights(target, tmp_path / "resnet18.pth") == {}
    assert _same_state(source, target)


def test_hpckd_checkpoint_loads_and_returns_its_meta(tmp_path):
    source = _trained_like("resnet20", 100, seed=3)
    meta = {"aug": "strong", "fingerprint": "abc", "val_acc": 0.71}
    save_checkpoint(tmp_path / "t.pt", {"model": source.state_dict(), "arch": "resnet20", "num_classes": 100,
                                        "config": {}, "meta": meta})
    target = create("resnet20", 100)
    got = load_weights(target, tmp_path / "t.pt")
    assert _same_state(source, target)
    assert got == {**meta, "arch": "resnet20", "num_classes": 100}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source.eval()(x), target.eval()(x))  # same logits after reload


def test_wrapper_prefixes_from_ddp_and_compile_are_stripped(tmp_path):
    source = _trained_like("resnet8", 10, seed=4)
    state = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "ddp.pt")
    target = create("resnet8", 10)
    load_weights(target, tmp_path / "ddp.pt")
    assert _same_state(source, target)


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"weights file not found: .*nope\.pt.*local files only"):
        load_weights(create("resnet8", 10), tmp_path / "nope.pt")


def test_corrupt_or_foreign_files_are_one_clear_error(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(CheckpointError, match="bad.pt is corrupt or unreadable"):
        load_weights(create("resnet8", 10), tmp_path / "bad.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither a state dict nor an hpckd checkpoint"):
        load_weights(create("resnet8", 10), tmp_path / "other.pt")


def test_wrong_class_count_names_file_classes_and_shapes(tmp_path):
    torch.save(create("resnet18", 100).state_dict(), tmp_path / "c100.pth")
    target = create("resnet18", 10)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_weights(target, tmp_path / "c100.pth")
    message = str(info.value)
    assert "\n" not in message
    assert "c100.pth" in message and "resnet18 (10 classes)" in message
    assert "wrong class count (checkpoint 100, model 10" in message
    assert "fc.weight: checkpoint (100, 512) vs model (10, 512)" in message
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # a failed load changes nothing


def test_architecture_mismatch_lists_shapes_and_keys(tmp_path):
    save_checkpoint(tmp_path / "r20.pt", {"model": create("resnet20", 10).state_dict(), "arch": "resnet20",
                                          "num_classes": 10, "config": {}, "meta": {}})
    with pytest.raises(CheckpointError) as info:
        load_weights(create("resnet32", 10), tmp_path / "r20.pt")
    message = str(info.value)
    assert "checkpoint arch resnet20" in message and "resnet32 (10 classes)" in message
    assert "missing in checkpoint: layers." in message and "more)" in message
    assert "wrong class count" not in message


def test_drop_head_loads_a_1000_class_backbone_into_a_100_class_model(tmp_path):
    """The attention study fine-tunes ImageNet-pretrained ResNet-50 teachers on 100-class data."""
    source = _trained_like("resnet18", 1000, seed=5)
    torch.save(source.state_dict(), tmp_path / "imagenet.pth")
    target = create("resnet18", 100)
    head_before = target.fc.weight.clone()
    load_weights(target, tmp_path / "imagenet.pth", drop_head=True)
    src, dst = source.state_dict(), target.state_dict()
    assert all(torch.equal(src[k], dst[k]) for k in dst if not k.startswith("fc."))
    assert torch.equal(target.fc.weight, head_before)  # the new classifier keeps its initialisation


def test_drop_head_still_rejects_a_wrong_backbone(tmp_path):
    torch.save(create("resnet34", 1000).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(CheckpointError, match="missing in checkpoint|not in model"):
        load_weights(create("resnet18", 100), tmp_path / "r34.pth", drop_head=True)
