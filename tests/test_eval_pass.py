"""The evaluation pass (hpckd.train.evaluation.evaluate) with real teachers: CAM-IoU between teachers checked
against an independent numpy computation of the attention study's Eq. 1."""

from __future__ import annotations

import numpy as np
import torch

from hpckd.train.experiment import load_experiment
from hpckd.data.batch import Batch
from hpckd.train.evaluation import evaluate
from hpckd.models import create
from hpckd.teachers import TeacherSet


def numpy_cam_iou(models, batches, threshold=0.4):
    """Per-image IoU of the thresholded, min-max normalised CAMs of the predicted class, averaged over images."""
    ious = []
    for batch in batches:
        cams = []
        for m in models:
            feats = m.features(batch.views["student"]).detach().double().numpy()  # (N, K, h, w)
            w = m.fc.weight.detach().double().numpy()
            b = m.fc.bias.detach().double().numpy()
            logits = feats.mean(axis=(2, 3)) @ w.T + b
            cls = logits.argmax(axis=1)
            cam = np.einsum("nkhw,nk->nhw", feats, w[cls]) + b[cls][:, None, None]
            lo = cam.min(axis=(1, 2), keepdims=True)
            hi = cam.max(axis=(1, 2), keepdims=True)
            cams.append((cam - lo) / np.where(hi > lo, hi - lo, 1.0) >= threshold)
        inter = (cams[0] & cams[1]).sum(axis=(1, 2))
        union = (cams[0] | cams[1]).sum(axis=(1, 2))
        ious += list(np.where(union > 0, inter / np.maximum(union, 1), 1.0))
    return float(np.mean(ious))


def test_teacher_cam_iou_matches_numpy_and_identical_teachers_give_one():
    torch.manual_seed(0)
    teachers = [create("resnet8", 5).eval(), create("resnet8", 5).eval()]
    student = create("resnet8", 5).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [Batch(views={"student": torch.randn(6, 3, 32, 32, generator=gen)}, labels=torch.randint(0, 5, (6,), generator=gen),
                     index=torch.arange(6) + 6 * i) for i in range(3)]
    cfg = load_experiment(None, [])
    metrics = evaluate(student, batches, TeacherSet.from_models(teachers, "cpu"), 5, cfg.metrics)
    assert metrics["teacher_iou_count"] == 18
    assert abs(metrics["teacher_iou"] - numpy_cam_iou(teachers, batches)) < 1e-6
    same = evaluate(student, batches, TeacherSet.from_models([teachers[0], teachers[0]], "cpu"), 5, cfg.metrics)
    assert same["teacher_iou"] == 1.0 and same["teacher_iou_pooled"] == 1.0
    off = evaluate(student, batches, TeacherSet.from_models(teachers, "cpu"), 5, load_experiment(None, ["metrics.attention_iou=false"]).metrics)
    assert "teacher_iou" not in off
