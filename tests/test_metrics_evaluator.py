"""The streaming Evaluator (one process): every metric against numpy, exactness under re-batching, options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hpckd.metrics import Evaluator, EvaluatorOptions
from tests.helpers import np_ece, np_log_softmax, np_mi_eq4, np_softmax

C = 7
FIXED = 2**-27  # tolerance of means of fixed-point sums (each addend rounded to 2**-28)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    n = 103
    s = rng.normal(scale=2.0, size=(n, C))
    t = s + rng.normal(scale=1.5, size=(n, C))
    y = np.where(rng.random(n) < 0.5, t.argmax(1), rng.integers(0, C, size=n))
    return {"s": s, "t": t, "y": y}


def _feed(ev: Evaluator, d: dict[str, np.ndarray], cuts: list[int], pad: int = 0) -> None:
    for a, b in zip(cuts[:-1], cuts[1:]):
        s, t, y = torch.from_numpy(d["s"][a:b]), torch.from_numpy(d["t"][a:b]), torch.from_numpy(d["y"][a:b])
        valid = torch.ones(b - a, dtype=torch.bool)
        if pad:  # loader padding: garbage rows (even NaN) with valid=False must never count
            s = torch.cat([s, torch.full((pad, C), float("nan"), dtype=s.dtype)])
            t = torch.cat([t, torch.randn(pad, C, dtype=t.dtype)])
            y = torch.cat([y, torch.zeros(pad, dtype=y.dtype)])
            valid = torch.cat([valid, torch.zeros(pad, dtype=torch.bool)])
        ev.update(s, y, teacher_logits=t, valid=valid)


def test_every_metric_against_numpy(data: dict[str, np.ndarray]) -> None:
    ev = Evaluator(C)
    _feed(ev, data, [0, 10, 11, 64, 103], pad=3)
    out = ev.compute()
    s, t, y = data["s"], data["t"], data["y"]
    ps, pt = np_softmax(s), np_softmax(t)
    top5 = np.argsort(-s, axis=1)[:, :5]
    assert out["count"] == 103
    assert out["accuracy"] == np.mean(s.argmax(1) == y)
    assert out["accuracy_top5"] == np.mean((top5 == y[:, None]).any(1))
    assert out["nll"] == pytest.approx(-np_log_softmax(s)[np.arange(103), y].mean(), abs=FIXED)
    assert out["entropy"] == pytest.approx(-(ps * np.log(ps)).sum(1).mean(), abs=FIXED)
    assert out["ece"] == pytest.approx(np_ece(ps, y, 15), abs=FIXED)
    assert out["teacher_accuracy"] == np.mean(t.argmax(1) == y)
    assert out["teacher_nll"] == pytest.approx(-np_log_softmax(t)[np.arange(103), y].mean(), abs=FIXED)
    assert out["teacher_entropy"] == pytest.approx(-(pt * np.log(pt)).sum(1).mean(), abs=FIXED)
    assert out["teacher_ece"] == pytest.approx(np_ece(pt, y, 15), abs=FIXED)
    assert out["top1_agreement"] == np.mean(t.argmax(1) == s.argmax(1))
    assert out["predictive_kl"] == pytest.approx(np.mean(np.sum(pt * np.log(pt / ps), 1)), abs=FIXED)
    mi = np_mi_eq4(t.argmax(1), s.argmax(1), C)
    assert out["mutual_information"] == pytest.approx(mi, rel=1e-12)
    ts, ss = t.argmax(1), s.argmax(1)
    cells = len(set(zip(ts, ss)))
    mm = mi + ((len(set(ts)) - 1) + (len(set(ss)) - 1) - (cells - 1)) / (2 * 103)  # Miller-Madow per entropy
    assert out["mutual_information_mm"] == pytest.approx(mm, rel=1e-12)
    diagram = ev.reliability()["student"]
    assert sum(diagram.counts) == 103


def test_results_are_bit_identical_for_any_batching(data: dict[str, np.ndarray]) -> None:
    results = []
    for cuts, pad in (([0, 103], 0), ([0, 1, 2, 50, 97, 103], 5), ([0, *range(7, 103, 7), 103], 1)):
        ev = Evaluator(C, tstddev_group_size=20)
        _feed(ev, data, cuts, pad)
        results.append(ev.compute())
    assert results[0] == results[1] == results[2]


def test_options_kl_ece_and_per_batch_mi(data: dict[str, np.ndarray]) -> None:
    s, t, y = data["s"], data["t"], data["y"]
    ps, pt = np_softmax(s), np_softmax(t)
    cuts = [0, 40, 80, 103]
    ev = Evaluator(C, kl_direction="student_teacher", kl_scale=10.0, ece_weighting="uniform", mi_estimator="per_batch")
    _feed(ev, data, cuts)
    out = ev.compute()
    assert out["predictive_kl"] == pytest.approx(10 * np.mean(np.sum(ps * np.log(ps / pt), 1)), abs=10 * FIXED)
    assert out["ece"] == pytest.approx(np_ece(ps, y, 15, weighted=False), abs=FIXED)
    per_batch = np.mean([np_mi_eq4(t[a:b].argmax(1), s[a:b].argmax(1), C) for a, b in zip(cuts[:-1], cuts[1:])])
    assert out["mutual_information"] == pytest.approx(per_batch, abs=FIXED)
    assert out["mutual_information"] != pytest.approx(np_mi_eq4(t.argmax(1), s.argmax(1), C), rel=1e-3)
    with pytest.raises(ValueError):
        Evaluator(4, EvaluatorOptions(kl_direction="sideways"))


def test_tstddev_through_the_evaluator(data: dict[str, np.ndarray]) -> None:
    ev = Evaluator(C, options=EvaluatorOptions(tstddev_group_size=20, tstddev_unbiased=False))
    _feed(ev, data, [0, 33, 103], pad=2)
    u = np_softmax(data["t"])[:100].reshape(5, 20, C).mean(axis=1)
    out = ev.compute()
    assert out["tstddev_groups"] == 5
    assert out["tstddev"] == pytest.approx(np.sqrt(u.var(axis=0)).mean(), rel=1e-7)


def test_memory_does_not_grow_with_samples(data: dict[str, np.ndarray]) -> None:
    ev = Evaluator(C)
    _feed(ev, data, [0, 10])
    size = sum(v.numel() for v in ev._state.values())
    for _ in range(20):
        _feed(ev, data, [0, 103])
    assert sum(v.numel() for v in ev._state.values()) == size
    assert ev.compute()["count"] == 10 + 20 * 103


def test_student_only_and_non_finite_outputs() -> None:
    ev = Evaluator(3)
    ev.update(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), torch.tensor([0, 0]))
    out = ev.compute()
    assert out["accuracy"] == 0.5 and "top1_agreement" not in out and "teacher_accuracy" not in out
    ev.update(torch.tensor([[float("nan"), 0.0, 0.0]]), torch.tensor([1]))
    bad = ev.compute()
    assert bad["count"] == 3 and math.isnan(bad["accuracy"]) and math.isnan(bad["nll"])
    ev.reset()
    assert ev.compute()["count"] == 0
    # a -inf log-probability is a legitimate zero probability (teacher log-probs), not a broken output
    ev.update(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0]), teacher_logits=torch.tensor([[0.0, -math.inf, -1.0]]))
    ok = ev.compute()
    assert ok["teacher_accuracy"] == 1.0 and ok["top1_agreement"] == 1.0 and math.isfinite(ok["predictive_kl"])
    p_t = np.array([1.0, 0.0, math.exp(-1.0)]) / (1 + math.exp(-1.0))
    p_s = np.exp([2.0, 0.0, 0.0]) / np.exp([2.0, 0.0, 0.0]).sum()
    kl = sum(p * math.log(p / q) for p, q in zip(p_t, p_s, strict=True) if p > 0)
    assert ok["predictive_kl"] == pytest.approx(kl, abs=FIXED)
    ev.reset()
    with pytest.raises(ValueError):
        ev.update(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))  # wrong number of classes
