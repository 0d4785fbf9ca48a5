"""hpckd.metrics tensor functions against independent numpy computations of the papers' formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hpckd.metrics import (
    ab_test_pvalue,
    accuracy,
    affinity,
    affinity_seed,
    correlation,
    ece,
    ensemble_logprobs,
    entropy,
    independent_student_baseline,
    mutual_information,
    nll,
    predictive_kl,
    reliability_diagram,
    teacher_correlation,
    teacher_covariance,
    top1_agreement,
    train_val_gap,
    tstddev,
)
from hpckd.metrics.exact import FRACTION_BITS, MAX_ADDEND, from_fixed, to_fixed
from hpckd.metrics.tstddev import TStdDev
from tests.helpers import np_ece, np_log_softmax, np_mi_eq4, np_softmax  # numpy references


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


# ---------------------------------------------------------------------------------------------- exact sums
def test_fixed_point_sums_are_order_independent_and_precise(rng: np.random.Generator) -> None:
    x = rng.normal(scale=5.0, size=10_000)
    forward = int(to_fixed(_t(x)).sum())
    backward = int(sum(int(v) for v in to_fixed(_t(x[::-1])).flip(0)))  # another order, Python ints
    assert forward == backward
    assert abs(float(from_fixed(torch.tensor(forward))) - math.fsum(x)) <= len(x) * 2.0 ** -(FRACTION_BITS + 1)
    # saturation instead of silent wrap-around; NaN counts as zero
    assert float(from_fixed(to_fixed(torch.tensor([1e300, -1e300, float("nan")])))[0]) == MAX_ADDEND
    assert int(to_fixed(torch.tensor([float("nan")]))[0]) == 0


# ---------------------------------------------------------------------------------------- classification
def test_accuracy_top1_and_topk_against_numpy(rng: np.random.Generator) -> None:
    z = rng.normal(size=(200, 10))
    y = rng.integers(0, 10, size=200)
    assert accuracy(_t(z), _t(y)) == pytest.approx(np.mean(z.argmax(1) == y), abs=0)
    top3 = np.argsort(-z, axis=1)[:, :3]
    assert accuracy(_t(z), _t(y), k=3) == pytest.approx(np.mean((top3 == y[:, None]).any(1)), abs=0)
    # hand-made: 2 of 3 right
    assert accuracy(torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


def test_nll_and_entropy_against_numpy(rng: np.random.Generator) -> None:
    z = rng.normal(scale=3.0, size=(100, 7))
    y = rng.integers(0, 7, size=100)
    ref_nll = -np_log_softmax(z)[np.arange(100), y].mean()
    assert nll(_t(z), _t(y)) == pytest.approx(ref_nll, rel=1e-12)
    # log-probabilities in give the same answer (log_softmax is idempotent)
    assert nll(_t(np_log_softmax(z)), _t(y)) == pytest.approx(ref_nll, rel=1e-12)
    p = np_softmax(z)
    assert entropy(_t(z)) == pytest.approx(-(p * np.log(p)).sum(1).mean(), rel=1e-12)
    assert entropy(torch.zeros(3, 5)) == pytest.approx(math.log(5))
    # a certain prediction (other probabilities exactly 0) has zero entropy, not NaN
    assert entropy(torch.tensor([[0.0, -math.inf, -math.inf]])) == 0.0
    per = entropy(_t(z), reduction="none")
    assert per.shape == (100,)


def test_train_val_gap() -> None:
    assert train_val_gap(0.95, 0.80) == pytest.approx(0.15)


# ------------------------------------------------------------------------------------------------ ensemble
def test_ensemble_modes_against_numpy(rng: np.random.Generator) -> None:
    members = [rng.normal(scale=2.0, size=(20, 5)) for _ in range(3)]
    mean_probs = np.log(np.mean([np_softmax(m) for m in members], axis=0))
    mean_logits = np_log_softmax(np.mean(members, axis=0))
    got_p = ensemble_logprobs([_t(m) for m in members])  # default = mean_probs (fidelity study)
    got_l = ensemble_logprobs([_t(m) for m in members], mode="mean_logits")
    np.testing.assert_allclose(got_p.numpy(), mean_probs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_l.numpy(), mean_logits, rtol=1e-12, atol=1e-12)
    assert not np.allclose(mean_probs, mean_logits)  # the option matters
    # hand-made: members [10, 0] and [0, 0] -> mean probability of class 0 = (sigmoid(10) + 0.5) / 2
    two = ensemble_logprobs([torch.tensor([[10.0, 0.0]]), torch.tensor([[0.0, 0.0]])]).exp()
    assert float(two[0, 0]) == pytest.approx((1 / (1 + math.exp(-10)) + 0.5) / 2, rel=1e-12)
    with pytest.raises(ValueError):
        ensemble_logprobs([_t(members[0])], mode="median")


# ------------------------------------------------------------------------------------------------ fidelity
def test_top1_agreement_and_predictive_kl_against_numpy(rng: np.random.Generator) -> None:
    t = rng.normal(scale=2.0, size=(300, 10))
    s = rng.normal(scale=2.0, size=(300, 10))
    assert top1_agreement(_t(t), _t(s)) == pytest.approx(np.mean(t.argmax(1) == s.argmax(1)), abs=0)
    pt, ps = np_softmax(t), np_softmax(s)
    forward = np.mean(np.sum(pt * np.log(pt / ps), axis=1))  # fidelity study Eq. 3
    reverse = np.mean(np.sum(ps * np.log(ps / pt), axis=1))
    assert predictive_kl(_t(t), _t(s)) == pytest.approx(forward, rel=1e-12)
    assert predictive_kl(_t(t), _t(s), direction="student_teacher", scale=10.0) == pytest.approx(
        10 * reverse, rel=1e-12
    )
    assert forward != pytest.approx(reverse, rel=1e-3)
    pt4, ps4 = np_softmax(t / 4), np_softmax(s / 4)
    assert predictive_kl(_t(t), _t(s), temperature=4.0) == pytest.approx(
        np.mean(np.sum(pt4 * np.log(pt4 / ps4), 1)), rel=1e-12
    )
    assert predictive_kl(_t(t), _t(t)) == pytest.approx(0.0, abs=1e-14)
    # teacher with zero-probability classes: those terms are 0 (p log p/q -> 0), result is finite
    zero_t = torch.tensor([[0.0, -math.inf]])
    assert predictive_kl(zero_t, torch.tensor([[0.0, 0.0]])) == pytest.approx(math.log(2))


def test_independent_student_baseline_hand_made() -> None:
    teacher = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.0, 3.0]])
    student = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])  # 3/4 agree
    other = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])  # 1/4 agree
    out = independent_student_baseline(teacher, student, other)
    assert out["top1_agreement"] == 0.75 and out["independent_top1_agreement"] == 0.25
    assert out["top1_agreement_excess"] == pytest.approx(0.5)
    assert out["predictive_kl"] < out["independent_predictive_kl"]


# ------------------------------------------------------------------------------------- mutual information
def test_mi_of_identical_labels_is_label_entropy(rng: np.random.Generator) -> None:
    y = rng.integers(0, 6, size=500)
    p = np.bincount(y, minlength=6) / len(y)
    h = -np.sum(p[p > 0] * np.log(p[p > 0]))
    assert mutual_information(_t(y), _t(y), 6) == pytest.approx(h, rel=1e-12)


def test_mi_of_independent_design_is_zero_and_random_matches_eq4(rng: np.random.Generator) -> None:
    t = np.arange(16) % 4
    s = np.arange(16) // 4  # every (t, s) pair exactly once: P(t, s) = P(t) P(s)
    assert mutual_information(_t(t), _t(s), 4) == pytest.approx(0.0, abs=1e-14)
    t = rng.integers(0, 5, size=400)
    s = np.where(rng.random(400) < 0.6, t, rng.integers(0, 5, size=400))
    assert mutual_information(_t(t), _t(s), 5) == pytest.approx(np_mi_eq4(t, s, 5), rel=1e-12)
    # logits in (argmax taken) == labels in
    logits = np.eye(5)[t] * 3 + rng.normal(scale=0.1, size=(400, 5))
    assert mutual_information(_t(logits), _t(s), 5) == pytest.approx(np_mi_eq4(logits.argmax(1), s, 5), rel=1e-12)


def test_mi_miller_madow_and_per_batch_options(rng: np.random.Generator) -> None:
    t = rng.integers(0, 4, size=90)
    s = np.where(rng.random(90) < 0.5, t, rng.integers(0, 4, size=90))
    n = len(t)
    m_t, m_s = len(np.unique(t)), len(np.unique(s))
    m_ts = len({(a, b) for a, b in zip(t, s)})
    expected_mm = np_mi_eq4(t, s, 4) + ((m_t - 1) + (m_s - 1) - (m_ts - 1)) / (2 * n)
    assert mutual_information(_t(t), _t(s), 4, miller_madow=True) == pytest.approx(expected_mm, rel=1e-12)
    # attention study code: mean of per-batch estimates (last batch smaller)
    per_batch = np.mean([np_mi_eq4(t[i : i + 32], s[i : i + 32], 4) for i in range(0, n, 32)])
    assert mutual_information(_t(t), _t(s), 4, batch_size=32) == pytest.approx(per_batch, rel=1e-12)
    assert per_batch != pytest.approx(np_mi_eq4(t, s, 4), rel=1e-3)  # the option matters


# ---------------------------------------------------------------------------------------------- calibration
def test_ece_of_perfectly_calibrated_toy_is_zero() -> None:
    # confidence 0.75 with 3 of 4 right, confidence 0.9 with 9 of 10 right, confidence 0.5 with 1 of 2 right
    rows, labels = [], []
    for conf, n, right in ((0.75, 4, 3), (0.9, 10, 9), (0.5, 2, 1)):
        for i in range(n):
            rows.append([math.log(conf), math.log(1 - conf)] if conf > 0.5 else [0.0, -1e-9])
            labels.append(0 if i < right else 1)
    logits, y = torch.tensor(rows, dtype=torch.float64), torch.tensor(labels)
    assert ece(logits, y, n_bins=10) == pytest.approx(0.0, abs=1e-8)
    assert ece(logits, y, n_bins=10, weighting="uniform") == pytest.approx(0.0, abs=1e-8)


def test_ece_hand_made_and_random_against_numpy(rng: np.random.Generator) -> None:
    # certain predictions (confidence 1), half right: |acc - conf| = 0.5
    logits = torch.tensor([[50.0, 0.0]] * 4)
    assert ece(logits, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.5, abs=1e-12)
    z = rng.normal(scale=2.5, size=(1000, 10))
    y = np.where(rng.random(1000) < 0.5, z.argmax(1), rng.integers(0, 10, size=1000))
    p = np_softmax(z)
    assert ece(_t(z), _t(y), n_bins=15) == pytest.approx(np_ece(p, y, 15), rel=1e-10)
    assert ece(_t(z), _t(y), n_bins=15, weighting="uniform") == pytest.approx(
        np_ece(p, y, 15, weighted=False), rel=1e-10
    )
    assert np_ece(p, y, 15) != pytest.approx(np_ece(p, y, 15, weighted=False), rel=1e-3)
    diagram = reliability_diagram(_t(z), _t(y), n_bins=15)
    conf = p.max(1)
    edges = np.arange(16) / 15
    counts = [int(((conf > lo) & (conf <= hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])]
    assert diagram.counts == counts and sum(diagram.counts) == 1000
    # right-closed bins ((m-1)/M, m/M]: confidence exactly 0.5 belongs to (0.25, 0.5], not (0.5, 0.75]
    assert reliability_diagram(torch.zeros(3, 2), torch.tensor([0, 1, 0]), n_bins=4).counts == [0, 3, 0, 0]
    k = int(np.argmax(counts))
    in_bin = (conf > edges[k]) & (conf <= edges[k + 1])
    assert diagram.accuracy[k] == pytest.approx((p.argmax(1) == y)[in_bin].mean(), rel=1e-12)
    assert diagram.confidence[k] == pytest.approx(conf[in_bin].mean(), rel=1e-12)


# ------------------------------------------------------------------------------------------------ T. stddev
def test_tstddev_against_numpy_and_hand_made(rng: np.random.Generator) -> None:
    probs = np_softmax(rng.normal(size=(6 * 40 + 17, 8)))  # 6 complete groups of 40, 17 dropped
    u = probs[: 6 * 40].reshape(6, 40, 8).mean(axis=1)  # Eq. 9
    assert tstddev(_t(probs), group_size=40) == pytest.approx(np.sqrt(u.var(axis=0, ddof=1)).mean(), rel=1e-12)
    assert tstddev(_t(probs), group_size=40, unbiased=False) == pytest.approx(np.sqrt(u.var(axis=0)).mean(), rel=1e-12)
    # groups [1,0],[1,0] | [0,1],[0,1]: u = [1,0], [0,1]; unbiased var per class 0.5 -> sqrt(0.5)
    hand = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert tstddev(hand, group_size=2) == pytest.approx(math.sqrt(0.5))
    assert math.isnan(tstddev(hand, group_size=4))  # one group: no spread to measure


def test_tstddev_covariance_and_correlation_variants_against_numpy(rng: np.random.Generator) -> None:
    probs = np_softmax(rng.normal(size=(70, 6)))
    batches = [probs[i : i + 32] for i in range(0, 70, 32)]  # 32, 32, 6
    v = np.mean([np.cov(b).mean() for b in batches])  # augmentation study Eq. 12-13 (numpy.cov convention)
    r = np.mean([np.corrcoef(b).mean() for b in batches])
    assert teacher_covariance(_t(probs), batch_size=32) == pytest.approx(v, rel=1e-10)
    assert teacher_correlation(_t(probs), batch_size=32) == pytest.approx(r, rel=1e-10)


def test_streaming_tstddev_matches_function_for_any_batching(rng: np.random.Generator) -> None:
    logits = rng.normal(size=(250, 5))
    probs = np_softmax(logits)
    u = probs[:240].reshape(6, 40, 5).mean(axis=1)
    expected = np.sqrt(u.var(axis=0, ddof=1)).mean()
    results = []
    for cuts in ([0, 250], [0, 7, 100, 101, 250]):
        acc = TStdDev(5, group_size=40)
        for a, b in zip(cuts[:-1], cuts[1:]):
            acc.update(_t(logits[a:b]))
        results.append(acc.compute())
    assert results[0] == results[1]  # bit-identical whatever the batching
    assert results[0]["tstddev"] == pytest.approx(expected, rel=1e-7)
    assert results[0]["tstddev_groups"] == 6
    # doubled batch: an original and its augmented copy share a position; 20 positions x 2 rows = groups of 40
    acc = TStdDev(5, group_size=40, rows_per_position=2)
    pos = torch.arange(125)
    acc.update(_t(logits[:125]), positions=pos)
    acc.update(_t(logits[125:]), positions=pos)
    paired = np.concatenate([probs[:125, None], probs[125:, None]], axis=1)  # (position, copy, C)
    u2 = paired[:120].reshape(6, 20 * 2, 5).mean(axis=1)
    assert acc.compute()["tstddev"] == pytest.approx(np.sqrt(u2.var(axis=0, ddof=1)).mean(), rel=1e-7)


# -------------------------------------------------------------------------------------------- affinity, stats
def test_affinity_eq5_and_fixed_seed() -> None:
    assert affinity(0.72, 0.80) == pytest.approx(0.9)
    assert math.isnan(affinity(0.0, 0.0))
    with pytest.raises(ValueError):
        affinity(72.0, 80.0)  # percentages, not accuracies
    assert affinity_seed("cifar100") == affinity_seed("cifar100")
    assert affinity_seed("cifar100") != affinity_seed("imagenet")


def test_ab_test_pvalue_eq9() -> None:
    # attention study Table A.1 (CIFAR100): fidelity vKD vs hKD; hKD never exceeds vKD -> p = 0 < 0.05
    vkd = [0.9523, 0.7859, 0.9411, 0.8536, 0.9387, 0.8568, 0.9048, 0.8897]
    hkd = [0.7564, 0.5921, 0.7295, 0.6520, 0.7248, 0.6513, 0.6621, 0.6801]
    assert ab_test_pvalue(vkd, hkd) == 0.0
    assert ab_test_pvalue([0.5, 0.5, 0.5, 0.5], [0.6, 0.4, 0.5, 0.3]) == 0.25  # 1 of 4 strictly greater
    with pytest.raises(ValueError):
        ab_test_pvalue([0.1, 0.2], [0.3])


def test_correlation_against_numpy_and_t_distribution(rng: np.random.Generator) -> None:
    from scipy import stats as sstats

    x = rng.normal(size=12)
    y = 0.5 * x + rng.normal(scale=0.5, size=12)
    out = correlation(x, y)
    r = np.corrcoef(x, y)[0, 1]
    t_stat = r * math.sqrt((12 - 2) / (1 - r * r))
    assert out.pearson_r == pytest.approx(r, rel=1e-12)
    assert out.pearson_p == pytest.approx(2 * sstats.t.sf(abs(t_stat), 10), rel=1e-8)
    ranks = lambda a: np.argsort(np.argsort(a))  # noqa: E731  (no ties in continuous data)
    assert out.spearman_rho == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1], rel=1e-12)
    assert out.n == 12 and 0.0 <= out.spearman_p <= 1.0
    assert correlation([1, 2, 3, 4], [8, 6, 4, 2]).pearson_r == pytest.approx(-1.0)
