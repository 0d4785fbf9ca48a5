"""The evaluation runs each CNN teacher once per batch (issue 17): the CAM feature map comes out of the forward pass
that gives the logits (:func:`hpckd.models.hooks.forward_with_cam`, ``TeacherSet.logits_and_cams``) instead of a
second, trunk-only pass.

The references are computed here from the models themselves (their ``forward`` and their trunk modules called in
the test), and the metrics of the one-pass evaluation are compared with those of the two-pass evaluation (a teacher
source without the one-pass capability) on the same tiny batches: they must be identical, not close.
"""

from __future__ import annotations

import torch
from torch import nn

from hpckd.data.batch import Batch
from hpckd.models import create
from hpckd.models.hooks import forward_with_cam
from hpckd.teachers import TeacherSet
from hpckd.train.evaluation import evaluate
from hpckd.train.experiment import load_experiment
from tests.helpers import TwoPassTeachers


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def torchvision_resnet_trunk(m, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ResNet up to layer4, written out here (not hpckd's trunk)."""
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))


@torch.no_grad()
def test_one_forward_gives_the_logits_and_the_feature_map_of_two_separate_passes():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 64, 64)
    cases = [  # (model, its feature map computed here, the module that runs once per trunk pass)
        (create("resnet8", 5), lambda m: m.features(x), lambda m: m.layers),  # CIFAR net: features() is a method
        (create("resnet18", 5), lambda m: torchvision_resnet_trunk(m, x), lambda m: m.layer4),  # hooked layer4
        (create("mobilenet_v2", 5), lambda m: m.features(x), lambda m: m.features[-1]),  # features is a module
        (create("resnet18d", 5), lambda m: m.forward_features(x), lambda m: m.layer4),  # timm: forward_features()
    ]
    for model, trunk, last in cases:
        model.eval()
        expected_logits, expected_features = model(x), trunk(model)
        attributes = dict(vars(model))
        calls = count_calls(last(model))
        logits, features, weight, bias = forward_with_cam(model, x)
        name = type(model).__name__
        assert calls == [1], name  # one pass of the trunk, not two
        assert torch.equal(logits, expected_logits) and torch.equal(features, expected_features), name
        assert weight is (model.fc.weight if hasattr(model, "fc") else model.classifier[-1].weight), name
        # Nothing stays behind: the instance's attributes are what they were (no wrapper shadowing features() or
        # forward_features()), and no forward hook but the test's own.
        assert vars(model).keys() == attributes.keys(), name
        assert all(vars(model)[key] is value for key, value in attributes.items()), name
        assert len(last(model)._forward_hooks) == 1, name
        model(x)
        assert calls == [2], name


def test_evaluation_runs_each_teacher_once_and_gives_the_two_pass_metrics():
    torch.manual_seed(0)
    models = [create("resnet8", 5).eval(), create("resnet8", 5).eval()]
    student = create("resnet8", 5).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [Batch(views={"student": torch.randn(6, 3, 32, 32, generator=gen)},
                     labels=torch.randint(0, 5, (6,), generator=gen), index=torch.arange(6) + 6 * i) for i in range(3)]
    teachers = TeacherSet.from_models(models, "cpu")
    # What the one-pass source gives per batch, against each model's forward and trunk called here.
    with torch.no_grad():
        for batch in batches:
            logits, cams = teachers.logits_and_cams(batch, [0, 1])
            x = batch.views["student"]
            for k, m in enumerate(models):
                assert torch.equal(logits[k], m(x)) and torch.equal(cams[k][0], m.features(x))
                assert torch.equal(cams[k][1], m.fc.weight) and torch.equal(cams[k][2], m.fc.bias)
    cfg = load_experiment(None, []).metrics
    first_convs = [count_calls(m.conv1) for m in models]
    one_pass = evaluate(student, batches, teachers, 5, cfg)
    assert [c[0] for c in first_convs] == [len(batches)] * 2  # each teacher ran once per batch
    two_pass = evaluate(student, batches, TwoPassTeachers(teachers), 5, cfg)
    assert [c[0] for c in first_convs] == [3 * len(batches)] * 2  # the old way: twice per batch
    assert "teacher_iou" in one_pass and one_pass["teacher_iou_count"] == 18
    assert one_pass == two_pass
