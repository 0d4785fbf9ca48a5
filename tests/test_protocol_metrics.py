"""The studies' public-code options of the metrics, each against an independent computation: a re-implementation of
the public code's arithmetic (numpy / the library calls it makes), a hand example, or the paper's formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpckd.metrics.attention import IoUAccumulator, attention_iou
from hpckd.metrics.calibration import ece
from hpckd.metrics.evaluator import Evaluator
from hpckd.metrics.information import knn_mutual_information
from hpckd.metrics.stats import normalized_accuracy
from hpckd.precision import PrecisionPolicy

from tests.helpers import np_log_softmax, np_mi_eq4, np_softmax


def code_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    """The attention study's calculate_ece.py: per bin accuracy and confidence (0 for an empty bin), then
    ``np.abs(acc - conf).mean()`` over all bins."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    edges = np.linspace(0, 1, n_bins + 1)
    acc, cnf = np.zeros(n_bins), np.zeros(n_bins)
    for m, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            acc[m] = (pred[in_bin] == labels[in_bin]).mean()
            cnf[m] = conf[in_bin].mean()
    return float(np.abs(acc - cnf).mean())


def test_ece_all_bins_is_the_public_codes_mean_over_all_ten_bins():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 5)) * 1.5
    y = rng.integers(0, 5, 300)
    probs = np_softmax(z)
    got = ece(torch.from_numpy(z), torch.from_numpy(y), n_bins=10, weighting="all_bins")
    assert got == pytest.approx(code_ece(probs, y, 10), abs=1e-12)
    # with empty bins (confidence >= 0.2 for 5 classes: bin 1 is always empty) the options differ
    assert got != pytest.approx(ece(torch.from_numpy(z), torch.from_numpy(y), n_bins=10, weighting="uniform"), abs=1e-6)
    # hand example: two samples, confidences 0.95 (right) and 0.55 (wrong): bins 9 and 5 -> (0.05 + 0.55) / 10
    z2 = torch.log(torch.tensor([[0.95, 0.05], [0.55, 0.45]], dtype=torch.float64))
    assert ece(z2, torch.tensor([0, 1]), n_bins=10, weighting="all_bins") == pytest.approx(0.06, abs=1e-12)
    ev = Evaluator(2, n_bins=10, ece_weighting="all_bins")
    ev.update(z2, torch.tensor([0, 1]))
    assert ev.compute()["ece"] == pytest.approx(0.06, abs=1e-8)


def code_batch_iou(cam1: torch.Tensor, cam2: torch.Tensor, size: tuple[int, int], threshold: float) -> float:
    """calculate-IoU.py of the attention study: raw maps upsampled to the input size, min-max per image with
    +1e-8, ``> threshold``, the batch's pooled IoU."""
    def binary(cam):
        up = F.interpolate(cam.unsqueeze(0), size=size, mode="bilinear", align_corners=False).squeeze(0)
        out = torch.zeros_like(up)
        for i in range(up.shape[0]):
            out[i] = (up[i] - up[i].min()) / (up[i].max() - up[i].min() + 1e-8)
        return (out > threshold).long()

    b1, b2 = binary(cam1), binary(cam2)
    # the code divides in float32; the pixel counts are what must agree, so divide them exactly here
    return int(torch.sum(b1 * b2)) / int(torch.sum((b1 + b2) > 0))


def test_cam_iou_code_form_and_batch_weighting_match_the_public_code():
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(n, 4, 4, generator=gen, dtype=torch.float64),
                torch.randn(n, 4, 4, generator=gen, dtype=torch.float64)) for n in (5, 3, 8)]
    acc = IoUAccumulator(threshold=0.4, size=(32, 32), form="code")
    for a, b in batches:
        acc.update(a, b)
    # the code's split value: sum_b IoU_b * n_b / sum_b n_b
    per_batch = [code_batch_iou(a, b, (32, 32), 0.4) for a, b in batches]
    expected = sum(v * a.shape[0] for v, (a, _) in zip(per_batch, batches)) / 16
    assert acc.compute()["iou_batch_pooled"] == pytest.approx(expected, abs=1e-7)
    # per batch, the code form's pooled IoU is exactly the code's
    for v, (a, b) in zip(per_batch, batches):
        assert attention_iou(a, b, size=(32, 32), reduction="pooled", form="code") == pytest.approx(v, abs=1e-12)
    # the order matters: the paper form (normalise at 4x4, upsample, >=) differs on these maps
    a, b = batches[2]
    assert attention_iou(a, b, size=(32, 32), form="code") != pytest.approx(attention_iou(a, b, size=(32, 32)), abs=1e-4)
    with pytest.raises(ValueError, match="input size"):
        attention_iou(a, b, form="code")


def test_knn_mutual_information_is_the_public_codes_sklearn_call_per_batch():
    from sklearn.feature_selection import mutual_info_classif

    rng = np.random.default_rng(1)
    t = rng.normal(size=(96, 6))
    s = t + rng.normal(size=(96, 6)) * 1.2
    ev = Evaluator(6, mi_knn=True)
    cuts = [0, 40, 96]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        ev.update(torch.from_numpy(s[lo:hi]), torch.zeros(hi - lo, dtype=torch.long), teacher_logits=torch.from_numpy(t[lo:hi]))
    # get_mi in the study's trainer.py: mutual_info_classif(student top-1 as a (N, 1) feature, teacher top-1)[0]
    code = [mutual_info_classif(s[lo:hi].argmax(1).reshape(-1, 1).astype(float), t[lo:hi].argmax(1), random_state=0)[0]
            for lo, hi in zip(cuts[:-1], cuts[1:])]
    out = ev.compute()
    assert out["mutual_information_knn"] == pytest.approx(np.mean(code), abs=1e-8)
    assert out["mutual_information"] == pytest.approx(np_mi_eq4(t.argmax(1), s.argmax(1), 6), abs=1e-8)  # Eq. 4 stays
    assert out["mutual_information_knn"] != pytest.approx(out["mutual_information"], abs=1e-3)
    assert knn_mutual_information(torch.from_numpy(t[:40]), torch.from_numpy(s[:40])) == pytest.approx(code[0], abs=1e-12)


def test_fidelity_means_of_per_batch_means_option():
    rng = np.random.default_rng(2)
    t, s = rng.normal(size=(50, 4)) * 2, rng.normal(size=(50, 4)) * 2
    cuts = [0, 7, 50]  # unequal batches: the two reductions differ
    by_sample, by_batch = Evaluator(4), Evaluator(4, fidelity_reduction="batch")
    for ev in (by_sample, by_batch):
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            ev.update(torch.from_numpy(s[lo:hi]), torch.zeros(hi - lo, dtype=torch.long),
                      teacher_logits=torch.from_numpy(t[lo:hi]))
    lt, ls = np_log_softmax(t), np_log_softmax(s)
    kl = (np.exp(lt) * (lt - ls)).sum(axis=1)  # Eq. 3 per sample
    agree = t.argmax(1) == s.argmax(1)  # Eq. 2 per sample
    batch = [(agree[lo:hi].mean(), kl[lo:hi].mean()) for lo, hi in zip(cuts[:-1], cuts[1:])]
    a, b = by_sample.compute(), by_batch.compute()
    assert a["top1_agreement"] == pytest.approx(agree.mean(), abs=1e-12)
    assert a["predictive_kl"] == pytest.approx(kl.mean(), abs=1e-7)
    assert b["top1_agreement"] == pytest.approx(np.mean([x for x, _ in batch]), abs=1e-8)
    assert b["predictive_kl"] == pytest.approx(np.mean([y for _, y in batch]), abs=1e-7)
    assert b["predictive_kl"] != pytest.approx(a["predictive_kl"], abs=1e-4)


def test_normalized_accuracy_by_hand():
    assert normalized_accuracy(0.70, 0.60, 0.80) == pytest.approx(0.5)
    assert normalized_accuracy(0.85, 0.60, 0.80) == pytest.approx(1.25)
    with pytest.raises(ValueError):
        normalized_accuracy(0.7, 0.6, 0.6)


def test_analysis_precision_overrides_the_training_teacher_dtype():
    train = PrecisionPolicy(torch.device("cpu"), precision="bf16")
    assert train.teacher_dtype == torch.bfloat16  # training: the student's autocast on CPU
    assert train.for_analysis("fp32").teacher_dtype is None
    assert train.for_analysis("bf16").teacher_dtype == torch.bfloat16
    with pytest.raises(ValueError):
        train.for_analysis("fp16")


@pytest.mark.parametrize("key, value", [("metrics.cam_iou_form", "cv2"), ("metrics.teacher_precision", "fp16"),
                                        ("metrics.fidelity_reduction", "epoch"), ("metrics.vit_attention", "grad"),
                                        ("metrics.ece_weighting", "code"), ("metrics.cam_size", "224")])
def test_bad_metric_options_are_one_line_naming_the_key(key, value):
    from hpckd.errors import ConfigError
    from hpckd.train.experiment import load_experiment

    with pytest.raises(ConfigError) as err:
        load_experiment(None, [f"{key}={value}"])
    assert key in str(err.value) and "\n" not in str(err.value)
