"""The evaluation pass as the attention study measures: teacher precision for analysis, hKD's half images for the
teachers, and ViT teachers' attention IoU, each against an independent numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from hpckd.data.batch import Batch
from hpckd.models import create
from hpckd.precision import PrecisionPolicy
from hpckd.teachers import TeacherSet
from hpckd.train.evaluation import evaluate
from hpckd.train.experiment import load_experiment

from tests.helpers import IMAGENET_MEAN, IMAGENET_STD, np_log_softmax

C = 5


def batches(n_batches=2, n=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [Batch(views={"student": torch.randn(n, 3, 32, 32, generator=gen)},
                  labels=torch.randint(0, C, (n,), generator=gen), index=torch.arange(n) + n * i)
            for i in range(n_batches)]


def np_cam(model, x: np.ndarray) -> np.ndarray:
    """CAM of the predicted class, computed from the model's trunk output and its fc weights in numpy."""
    with torch.no_grad():
        feats = model.features(torch.from_numpy(x).float()).double().numpy()
    w, b = model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    cls = (feats.mean(axis=(2, 3)) @ w.T + b).argmax(axis=1)
    return np.einsum("nkhw,nk->nhw", feats, w[cls]) + b[cls][:, None, None]


def np_regions(maps: np.ndarray, threshold: float = 0.4) -> np.ndarray:
    lo = maps.min(axis=(1, 2), keepdims=True)
    hi = maps.max(axis=(1, 2), keepdims=True)
    return (maps - lo) / np.where(hi > lo, hi - lo, 1.0) >= threshold


def np_iou(a: np.ndarray, b: np.ndarray) -> list[float]:
    inter, union = (a & b).sum(axis=(1, 2)), (a | b).sum(axis=(1, 2))
    return list(np.where(union > 0, inter / np.maximum(union, 1), 1.0))


def np_nll(logp: np.ndarray, labels: np.ndarray) -> float:
    return float(-logp[np.arange(len(labels)), labels].mean())


def ensemble_logp(logits: list[np.ndarray]) -> np.ndarray:
    return np.log(np.mean([np.exp(np_log_softmax(z)) for z in logits], axis=0))  # mean_probs


@pytest.fixture(scope="module")
def cnn_teachers():
    torch.manual_seed(0)
    return [create("resnet8", C).eval(), create("resnet8", C).eval()]


def test_teachers_run_at_metrics_teacher_precision_and_training_precision_comes_back(cnn_teachers):
    student = create("resnet8", C).eval()
    data = batches()
    policy = PrecisionPolicy(torch.device("cpu"), precision="bf16")  # training: bf16 teachers
    teachers = TeacherSet.from_models(cnn_teachers, "cpu", precision=policy)
    labels = np.concatenate([b.labels.numpy() for b in data])
    x = torch.cat([b.views["student"] for b in data])
    with torch.no_grad():
        fp32 = [m(x).double().numpy() for m in cnn_teachers]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = [m(x).float().double().numpy() for m in cnn_teachers]
    for precision, logits in (("fp32", fp32), ("bf16", bf16)):
        cfg = load_experiment(None, [f"metrics.teacher_precision={precision}"])
        out = evaluate(student, data, teachers, C, cfg.metrics)
        assert out["teacher_nll"] == pytest.approx(np_nll(ensemble_logp(logits), labels), abs=1e-6), precision
        assert teachers.precision is policy  # training's policy is back after the pass
    assert np_nll(ensemble_logp(fp32), labels) != pytest.approx(np_nll(ensemble_logp(bf16), labels), abs=1e-6)


def test_hkd_mask_split_teacher_iou_and_fidelity_on_the_halves_the_teachers_saw(cnn_teachers):
    student = create("resnet8", C).eval()
    data = batches()
    cfg = load_experiment(None, ["metrics.cam_size=map"])
    out = evaluate(student, data, TeacherSet.from_models(cnn_teachers, "cpu"), C, cfg.metrics, half_split="mask",
                   mean=IMAGENET_MEAN, std=IMAGENET_STD)
    black = (-np.asarray(IMAGENET_MEAN) / np.asarray(IMAGENET_STD)).reshape(1, 3, 1, 1)
    ious, logps, labels = [], [], []
    for b in data:
        x = b.views["student"].numpy().astype(np.float64)
        left, right = x.copy(), x.copy()
        left[..., 16:] = black  # teacher 0 sees the left half, teacher 1 the right half (Sec. 6.2, hKD)
        right[..., :16] = black
        ious += np_iou(np_regions(np_cam(cnn_teachers[0], left)), np_regions(np_cam(cnn_teachers[1], right)))
        with torch.no_grad():
            z = [m(torch.from_numpy(v).float()).double().numpy() for m, v in zip(cnn_teachers, (left, right))]
        logps.append(ensemble_logp(z))
        labels.append(b.labels.numpy())
    assert out["teacher_iou"] == pytest.approx(np.mean(ious), abs=1e-6)
    assert out["teacher_nll"] == pytest.approx(np_nll(np.concatenate(logps), np.concatenate(labels)), abs=1e-6)
    whole = evaluate(student, data, TeacherSet.from_models(cnn_teachers, "cpu"), C, cfg.metrics)
    assert whole["teacher_iou"] != pytest.approx(out["teacher_iou"], abs=1e-3)  # the split is not ignored


def test_hkd_crop_split_feeds_the_teachers_half_width_images(cnn_teachers):
    student = create("resnet8", C).eval()
    data = batches()
    cfg = load_experiment(None, [])
    out = evaluate(student, data, TeacherSet.from_models(cnn_teachers, "cpu"), C, cfg.metrics, half_split="crop")
    logps, labels = [], []
    for b in data:
        x = b.views["student"]
        with torch.no_grad():
            z = [cnn_teachers[0](x[..., :16]).double().numpy(), cnn_teachers[1](x[..., 16:]).double().numpy()]
        logps.append(ensemble_logp(z))
        labels.append(b.labels.numpy())
    assert out["teacher_nll"] == pytest.approx(np_nll(np.concatenate(logps), np.concatenate(labels)), abs=1e-6)
    assert out["teacher_iou_count"] == 12 and 0.0 <= out["teacher_iou"] < 1.0


def tiny_vit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                                mlp_dim=32, num_classes=C).eval()


def np_cls_attention(vit, x: np.ndarray) -> np.ndarray:
    """Last (only) block's CLS-to-patch attention, heads averaged, from the ViT's weights in numpy (App. A.7)."""
    p = {k: v.detach().double().numpy() for k, v in vit.state_dict().items()}
    n, d, heads = x.shape[0], 16, 2
    patches = x.reshape(n, 3, 4, 8, 4, 8).transpose(0, 2, 4, 1, 3, 5).reshape(n, 16, 3 * 64)
    tokens = patches @ p["conv_proj.weight"].reshape(d, -1).T + p["conv_proj.bias"]
    cls = np.broadcast_to(p["class_token"].reshape(1, 1, d), (n, 1, d))
    h = np.concatenate([cls, tokens], axis=1) + p["encoder.pos_embedding"]
    pre = "encoder.layers.encoder_layer_0."
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mu) / np.sqrt(var + 1e-6) * p[pre + "ln_1.weight"] + p[pre + "ln_1.bias"]
    qkv = h @ p[pre + "self_attention.in_proj_weight"].T + p[pre + "self_attention.in_proj_bias"]
    q, k = qkv[..., :d], qkv[..., d:2 * d]
    q = q.reshape(n, 17, heads, 8).transpose(0, 2, 1, 3)
    k = k.reshape(n, 17, heads, 8).transpose(0, 2, 1, 3)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(8)
    attn = np.exp(scores - scores.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    return attn.mean(axis=1)[:, 0, 1:].reshape(n, 4, 4)


def test_vit_teachers_attention_iou_from_cls_attention_matches_numpy():
    vits = [tiny_vit(1), tiny_vit(2)]
    student = create("resnet8", C).eval()
    data = batches()
    cfg = load_experiment(None, ["metrics.vit_attention=cls"])
    out = evaluate(student, data, TeacherSet.from_models(vits, "cpu"), C, cfg.metrics)
    ious = []
    for b in data:
        x = b.views["student"].numpy().astype(np.float64)
        ious += np_iou(np_regions(np_cls_attention(vits[0], x)), np_regions(np_cls_attention(vits[1], x)))
    assert out["teacher_iou_count"] == 12
    assert out["teacher_iou"] == pytest.approx(np.mean(ious), abs=1e-6)
    # one block: the rollout's CLS row is 0.5 A_cls on the patches (the identity only adds to the CLS column), so
    # after min-max normalisation it gives the same regions
    rollout = evaluate(student, data, TeacherSet.from_models(vits, "cpu"), C,
                       load_experiment(None, ["metrics.vit_attention=rollout"]).metrics)
    assert rollout["teacher_iou"] == pytest.approx(out["teacher_iou"], abs=1e-6)


def test_crop_half_maps_are_placed_in_their_half_of_the_frame():
    from hpckd.metrics.attention import attention_masks
    from hpckd.train.evaluation import in_frame

    gen = torch.Generator().manual_seed(4)
    left, right = torch.randn(3, 4, 2, generator=gen), torch.randn(3, 4, 2, generator=gen)
    a, b = in_frame(left, 0, 16, (32, 32)), in_frame(right, 1, 16, (32, 32))
    ma, mb = attention_masks(a), attention_masks(b)
    assert ma[..., 16:].sum() == 0 and mb[..., :16].sum() == 0  # each region only where its teacher looked
    assert ma[..., :16].sum() > 0 and mb[..., 16:].sum() > 0
    # the half keeps its own map's values: bilinear 4x2 -> 32x16 preserves each map's extremes' ordering
    assert torch.equal(a[..., :16].amax(dim=(1, 2)), a.amax(dim=(1, 2)))
    assert float(a[0, 0, 20]) == pytest.approx(float(a[0, :, :16].min()))  # the other half sits at the minimum
