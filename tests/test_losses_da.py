"""Tests of the augmentation study's losses: KD + DA on a doubled batch, and CutMixPick scoring/selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpckd.config.methods import BatchOpsConfig, DAConfig
from hpckd.data.batch import Batch
from hpckd.data.batchops import validated
from hpckd.data.cutmixpick import n_keep, needs_student, pick_indices, pick_scores, select
from hpckd.errors import ConfigError
from hpckd.losses import LossConfig, build_loss
from tests import helpers as ref
from tests.helpers import np_, rand_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def doubled_batch(labels, doubled, valid=None) -> Batch:
    labels = torch.as_tensor(labels)
    n = labels.numel()
    return Batch(
        views={"student": torch.zeros(n, 3, 2, 2)},
        labels=labels,
        index=torch.arange(n),
        doubled=torch.as_tensor(doubled, dtype=torch.bool),
        valid=None if valid is None else torch.as_tensor(valid, dtype=torch.bool),
    )


# ---------------------------------------------------------------- KD + DA, doubled batch

ORIG, AUG = [0, 1, 2], [3, 4, 5]
DOUBLED = [False, False, False, True, True, True]


def expected_kd_da(s, t, labels, ce_w, kd_w, aug_w, tau, keep=None):
    s, t = np_(s), np_(t)
    orig = [i for i in ORIG if keep is None or i in keep]
    aug = [i for i in AUG if keep is None or i in keep]
    ce = ref.ce(s[orig], [labels[i] for i in orig]).mean()
    kl_orig = ref.kd_kl(s[orig], t[orig], tau).mean()
    kl_aug = ref.kd_kl(s[aug], t[aug], tau).mean()
    return ce_w * ce + kd_w * (kl_orig + aug_w * kl_aug), ce, kl_orig, kl_aug


def test_kd_da_golden_values():
    s, t = rand_logits(6, 5, 0), rand_logits(6, 5, 1)
    labels = [0, 1, 2, 3, 4, 0]
    cfg = LossConfig(name="kd_da", alpha=0.1, tau=4.0, kd_form="kl", da=DAConfig(aug_kd_weight=0.5))
    out = build_loss(cfg)(s, [t], doubled_batch(labels, DOUBLED))
    total, ce, kl_orig, kl_aug = expected_kd_da(s, t, labels, 0.1, 0.9, 0.5, 4.0)
    assert out["loss"].item() == pytest.approx(total, rel=1e-10)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-10)
    assert out["kd"].item() == pytest.approx(kl_orig, rel=1e-10)
    assert out["kd_aug"].item() == pytest.approx(kl_aug, rel=1e-10)


def test_kd_da_ignores_labels_of_augmented_half():
    s, t = rand_logits(6, 5, 2), rand_logits(6, 5, 3)
    loss = build_loss(LossConfig(name="kd_da", alpha=0.1, tau=4.0, kd_form="kl"))
    a = loss(s, [t], doubled_batch([0, 1, 2, 3, 4, 0], DOUBLED))["loss"].item()
    b = loss(s, [t], doubled_batch([0, 1, 2, 1, 1, 1], DOUBLED))["loss"].item()
    assert a == b
    c = loss(s, [t], doubled_batch([4, 1, 2, 3, 4, 0], DOUBLED))["loss"].item()
    assert c != pytest.approx(a)  # original-half labels do count


def test_kd_da_marker_in_any_order_and_with_padding():
    s, t = rand_logits(6, 5, 4), rand_logits(6, 5, 5)
    labels = [0, 1, 2, 3, 4, 0]
    perm = [3, 0, 4, 1, 5, 2]  # interleave the halves
    loss = build_loss(LossConfig(name="kd_da", alpha=0.1, tau=4.0, kd_form="kl"))
    base = loss(s, [t], doubled_batch(labels, DOUBLED))["loss"].item()
    shuffled = loss(s[perm], [t[perm]], doubled_batch([labels[i] for i in perm], [DOUBLED[i] for i in perm]))
    assert shuffled["loss"].item() == pytest.approx(base, rel=1e-12)
    valid = [True, False, True, True, True, False]
    out = loss(s, [t], doubled_batch(labels, DOUBLED, valid=valid))
    total, *_ = expected_kd_da(s, t, labels, 0.1, 0.9, 1.0, 4.0, keep=[0, 2, 3, 4])
    assert out["loss"].item() == pytest.approx(total, rel=1e-10)


def test_kd_da_gradcheck():
    t = rand_logits(6, 4, 6)
    b = doubled_batch([0, 1, 2, 3, 0, 1], DOUBLED)
    loss = build_loss(LossConfig(name="kd_da", alpha=0.1, tau=4.0, kd_form="kl"))
    s = rand_logits(6, 4, 7).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss(x, [t], b)["loss"], (s,), eps=1e-6, atol=1e-7)


def test_kd_da_requires_the_marker():
    b = Batch(views={"student": torch.zeros(2, 3, 2, 2)}, labels=torch.tensor([0, 1]), index=torch.arange(2))
    with pytest.raises(ConfigError, match=r"needs a doubled batch \(batch.doubled"):
        build_loss(LossConfig(name="kd_da"))(rand_logits(2, 3, 0), [rand_logits(2, 3, 1)], b)
    with pytest.raises(ConfigError, match="marks 3 samples but the student gave 2"):
        build_loss(LossConfig(name="kd_da"))(
            rand_logits(2, 3, 0), [rand_logits(2, 3, 1)], doubled_batch([0, 1], [True] * 3)
        )


# ---------------------------------------------------------------- CutMixPick


def test_pick_indices_both_orders_by_hand():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2])
    assert pick_indices(scores, 0.5, "highest").tolist() == [1, 4, 2]  # the study's code
    assert pick_indices(scores, 0.5, "lowest").tolist() == [0, 5, 3]  # the study's text, read literally
    assert pick_indices(scores, 1.0, "highest").tolist() == [1, 4, 2, 3, 5, 0]
    with pytest.raises(ConfigError, match="highest or lowest"):
        pick_indices(scores, 0.5, "middle")


def test_n_keep_rounds_and_keeps_at_least_one():
    assert [n_keep(128, 0.5), n_keep(5, 0.5), n_keep(3, 0.1), n_keep(4, 1.0)] == [64, 3, 1, 4]


def test_pick_scores_against_numpy():
    t, s = rand_logits(8, 6, 10), rand_logits(8, 6, 11)
    assert np.allclose(pick_scores(t, s, "teacher_entropy").numpy(), ref.entropy(np_(t)), rtol=1e-5)
    assert np.allclose(pick_scores(t, s, "student_entropy").numpy(), ref.entropy(np_(s)), rtol=1e-5)
    kl = ref.kd_kl(np_(s), np_(t), 4.0) / 16.0
    assert np.allclose(pick_scores(t, s, "kl", tau=4.0).numpy(), kl, rtol=1e-4, atol=1e-7)


def test_select_keeps_highest_teacher_entropy_by_default():
    # Rows: near one-hot (low entropy) ... uniform (maximal entropy); a pool of 4, keep 2.
    t = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    cfg = validated(BatchOpsConfig(scheme="cutmix_pick"))
    assert cfg.pick_criterion == "teacher_entropy" and cfg.pick_ratio == 0.5 and cfg.pick_order == "highest"
    assert select(t, None, cfg).tolist() == [1, 3]
    assert select(t, None, BatchOpsConfig(pick_order="lowest")).tolist() == [0, 2]
    assert not needs_student(cfg) and needs_student(BatchOpsConfig(scheme="cutmix_pick", pick_criterion="kl"))
    assert needs_student(BatchOpsConfig(scheme="cutmix_pick", pick_criterion="student_entropy"))
    assert not needs_student(BatchOpsConfig(scheme="cutmix", pick_criterion="kl")), "no pool, no student pass"


def test_select_by_kl_and_student_entropy_orders():
    t = torch.zeros(4, 3)
    s = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    # KL(uniform || student) grows with the student's peakedness; student entropy shrinks with it.
    assert select(t, s, BatchOpsConfig(pick_criterion="kl", pick_tau=1.0)).tolist() == [1, 3]
    assert select(t, s, BatchOpsConfig(pick_criterion="kl", pick_tau=1.0, pick_order="lowest")).tolist() == [0, 2]
    assert select(t, s, BatchOpsConfig(pick_criterion="student_entropy")).tolist() == [0, 2]
    with pytest.raises(ConfigError, match="needs the student's logits"):
        select(t, None, BatchOpsConfig(pick_criterion="student_entropy"))


def test_kl_criterion_scores_at_batch_ops_pick_tau():
    """The kl criterion's temperature is batch_ops.pick_tau (the loss config no longer reaches the batch ops)."""
    t, s = rand_logits(8, 5, 40), rand_logits(8, 5, 60)
    picked = {}
    for tau in (1.0, 8.0):
        kl = ref.kd_kl(np_(s), np_(t), tau) / tau**2  # plain KL(p_t || p_s) at temperature tau
        expected = np.argsort(-kl, kind="stable")[:4]
        picked[tau] = select(t, s, BatchOpsConfig(pick_criterion="kl", pick_tau=tau)).tolist()
        assert picked[tau] == expected.tolist()
    assert set(picked[1.0]) != set(picked[8.0]), "the temperature must change the choice on these logits"
