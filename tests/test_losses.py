"""Tests of hpckd.losses: registry, CE, Hinton/ensemble KD, pure KD, logit-standardised KD, bad input.

Expected values come from the numpy references in ``tests/helpers.py`` (the papers' formulas) or by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from hpckd.errors import ConfigError
from hpckd.losses import (
    DAConfig,
    LossConfig,
    NonFiniteError,
    TargetsConfig,
    WSLConfig,
    available,
    build_loss,
    check_loss_finite,
)
from hpckd.losses.config import SECTION_CHECKS, validated
from tests import helpers as ref
from tests.helpers import label_batch as make_batch, np_, rand_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---------------------------------------------------------------- registry and config


def test_available_lists_every_method():
    assert {"ce", "kd", "ensemble_kd", "pure_kd", "standardized_kd", "kd_da", "wsl", "ckm", "soft_target_kd"} <= set(
        available()
    )


def test_unknown_loss_name_names_closest():
    with pytest.raises(ConfigError, match="did you mean 'ensemble_kd'"):
        build_loss(LossConfig(name="ensemble_dk"))


def test_unknown_loss_key_names_closest():
    with pytest.raises(ConfigError, match="loss.kd_weight"):
        build_loss({"name": "kd", "kd_weigth": 0.5})


def test_subsections_from_nested_mappings_and_their_unknown_keys():
    loss = build_loss({"name": "wsl", "wsl": {"weight_tau": "one"}, "targets": {"subset": "correct"}})
    assert loss.cfg.wsl == WSLConfig(weight_tau="one") and loss.cfg.targets.subset == "correct"
    assert loss.cfg.da == DAConfig(), "untouched subsections keep their defaults"
    with pytest.raises(ConfigError, match=r"'loss.wsl.weight_tua' \(did you mean 'loss.wsl.weight_tau'\?\)"):
        build_loss({"name": "wsl", "wsl": {"weight_tua": "one"}})
    with pytest.raises(ConfigError, match=r"'loss.pick_ratio' moved to 'batch_ops.pick_ratio'"):
        build_loss({"name": "kd", "pick_ratio": 0.3})


def test_every_loss_subsection_has_its_validator():
    import dataclasses

    nested = {f.name for f in dataclasses.fields(LossConfig) if dataclasses.is_dataclass(f.default_factory)}
    assert nested == set(SECTION_CHECKS) == {"da", "wsl", "targets"}


def test_build_from_dictconfig_and_experiment_config():
    from hpckd.train.experiment import load_experiment

    cfg = load_experiment(overrides=["loss.name=kd", "loss.alpha=0.25", "loss.tau=2.0"])
    loss = build_loss(cfg.loss)
    assert (loss.cfg.ce_weight, loss.cfg.kd_weight, loss.cfg.tau) == (0.25, 0.75, 2.0)
    loss2 = build_loss(OmegaConf.create({"name": "ce"}))
    assert loss2.name == "ce"


def test_alpha_is_the_hard_label_weight():
    cfg = validated(LossConfig(name="kd", alpha=0.2))
    assert (cfg.ce_weight, cfg.kd_weight) == (0.2, 0.8)
    assert validated(cfg) == cfg  # idempotent
    with pytest.raises(ConfigError, match="both set"):
        validated(LossConfig(alpha=0.2, ce_weight=0.5, kd_weight=0.5))
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        validated(LossConfig(alpha=1.5))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("tau", 0.0, "> 0"),
        ("kd_form", "mse", "cross_entropy, kl"),
        ("da", DAConfig(aug_kd_weight=-0.5), "'loss.da.aug_kd_weight' is -0.5; it must be >= 0"),
        ("wsl", WSLConfig(weight_tau="two"), "'loss.wsl.weight_tau' is 'two'; choose one of tau, one"),
        ("targets", TargetsConfig(subset="hard"), "'loss.targets.subset' is 'hard'"),
        ("targets", TargetsConfig(replace="most"), "'loss.targets.replace' is 'most'"),
        ("targets", TargetsConfig(manipulate="sharpen"), "'loss.targets.manipulate' is 'sharpen'"),
        ("targets", TargetsConfig(smoothing=1.5), r"'loss.targets.smoothing' is 1.5; choose a value in \[0, 1\]"),
        ("targets", TargetsConfig(smoothing_form="paper"), "'loss.targets.smoothing_form' is 'paper'"),
        ("targets", TargetsConfig(amplify_delta=-0.1), "'loss.targets.amplify_delta' is -0.1"),
        ("ensemble", "vote", "per_teacher_loss, mean_probs, mean_logits"),
        ("kd_weight", -1.0, ">= 0"),
    ],
)
def test_bad_config_values(field, value, message):
    with pytest.raises(ConfigError, match=message):
        build_loss(LossConfig(name="kd", **{field: value}))


# ---------------------------------------------------------------- CE and KD golden values


def test_ce_golden_and_hand_value():
    loss = build_loss(LossConfig(name="ce"))
    out = loss(torch.zeros(1, 3), [], make_batch([1]))
    assert out["loss"].item() == pytest.approx(math.log(3.0), rel=1e-6)
    s = rand_logits(5, 7, 0)
    labels = [0, 6, 3, 3, 2]
    out = loss(s, [], make_batch(labels))
    assert out["loss"].item() == pytest.approx(ref.ce(np_(s), labels).mean(), rel=1e-10)
    assert set(out) == {"loss", "ce"}


def test_ce_label_smoothing_golden():
    s = rand_logits(4, 5, 1)
    labels = [1, 2, 0, 4]
    out = build_loss(LossConfig(name="ce", label_smoothing=0.1))(s, [], make_batch(labels))
    assert out["loss"].item() == pytest.approx(ref.ce(np_(s), labels, eps=0.1).mean(), rel=1e-10)


def test_kd_hand_value_both_forms():
    zs, zt = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    b = make_batch([0])
    ce_form = build_loss(LossConfig(name="kd", alpha=0.0, tau=1.0))(zs, [zt], b)
    kl_form = build_loss(LossConfig(name="kd", alpha=0.0, tau=1.0, kd_form="kl"))(zs, [zt], b)
    assert ce_form["kd"].item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert kl_form["kd"].item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-5)


@pytest.mark.parametrize("form", ["cross_entropy", "kl"])
def test_ensemble_kd_golden(form):
    s, t0, t1 = rand_logits(4, 5, 2).requires_grad_(), rand_logits(4, 5, 3), rand_logits(4, 5, 4)
    labels = [0, 1, 4, 2]
    cfg = LossConfig(name="ensemble_kd", tau=3.0, ce_weight=0.3, kd_weight=0.7, kd_form=form)
    out = build_loss(cfg)(s, [t0, t1], make_batch(labels))
    kd_fn = ref.kd_ce if form == "cross_entropy" else ref.kd_kl
    kd0, kd1 = kd_fn(np_(s), np_(t0), 3.0).mean(), kd_fn(np_(s), np_(t1), 3.0).mean()
    ce = ref.ce(np_(s), labels).mean()
    assert out["kd0"].item() == pytest.approx(kd0, rel=1e-10)
    assert out["kd1"].item() == pytest.approx(kd1, rel=1e-10)
    assert out["kd"].item() == pytest.approx((kd0 + kd1) / 2, rel=1e-10)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-10)
    assert out["loss"].item() == pytest.approx(0.3 * ce + 0.7 * (kd0 + kd1) / 2, rel=1e-10)
    assert out["loss"].requires_grad and not out["kd"].requires_grad


def test_attention_study_eq8_default_weights():
    # Eq. 8: L = L_NLL + 1/2 (L_KD1 + L_KD2) with the default weights 1 and 1.
    s, t0, t1 = rand_logits(3, 4, 5), rand_logits(3, 4, 6), rand_logits(3, 4, 7)
    out = build_loss(LossConfig(name="ensemble_kd", tau=10.0))(s, [t0, t1], make_batch([0, 1, 2]))
    expected = ref.ce(np_(s), [0, 1, 2]).mean() + 0.5 * (
        ref.kd_ce(np_(s), np_(t0), 10.0).mean() + ref.kd_ce(np_(s), np_(t1), 10.0).mean()
    )
    assert out["loss"].item() == pytest.approx(expected, rel=1e-10)


def test_teacher_temperature_differs_from_student():
    s, t = rand_logits(3, 6, 8), rand_logits(3, 6, 9)
    out = build_loss(LossConfig(name="kd", alpha=0.0, tau=1.0, teacher_tau=0.7))(s, [t], make_batch([0, 1, 2]))
    assert out["kd"].item() == pytest.approx(ref.kd_ce(np_(s), np_(t), 1.0, tau_t=0.7).mean(), rel=1e-10)


# ---------------------------------------------------------------- properties


def test_kl_form_nonnegative_and_zero_when_logits_match():
    loss = build_loss(LossConfig(name="kd", alpha=0.0, tau=4.0, kd_form="kl"))
    for seed in range(5):
        s, t = rand_logits(6, 10, 10 + seed), rand_logits(6, 10, 20 + seed)
        assert loss(s, [t], make_batch([0] * 6))["kd"].item() >= 0.0
    t = rand_logits(6, 10, 30)
    assert loss(t.clone(), [t], make_batch([0] * 6))["kd"].item() == pytest.approx(0.0, abs=1e-12)
    # A per-sample constant shift does not change the softmax either.
    assert loss(t + 5.0, [t], make_batch([0] * 6))["kd"].item() == pytest.approx(0.0, abs=1e-12)


def test_cross_entropy_form_exceeds_kl_by_teacher_entropy():
    s, t = rand_logits(5, 8, 40), rand_logits(5, 8, 41)
    tau = 2.5
    b = make_batch([0] * 5)
    ce_form = build_loss(LossConfig(name="kd", alpha=0.0, tau=tau))(s, [t], b)["kd"].item()
    kl_form = build_loss(LossConfig(name="kd", alpha=0.0, tau=tau, kd_form="kl"))(s, [t], b)["kd"].item()
    assert ce_form - kl_form == pytest.approx(tau**2 * ref.entropy(np_(t), tau).mean(), rel=1e-10)


def test_ensemble_of_identical_teachers_equals_one_teacher():
    s = rand_logits(4, 6, 50).requires_grad_()
    t = rand_logits(4, 6, 51)
    b = make_batch([0, 1, 2, 3])
    loss = build_loss(LossConfig(name="ensemble_kd", tau=4.0, ce_weight=0.5, kd_weight=0.5))
    one = loss(s, [t], b)["loss"]
    (g_one,) = torch.autograd.grad(one, s)
    three = loss(s, [t, t.clone(), t.clone()], b)["loss"]
    (g_three,) = torch.autograd.grad(three, s)
    assert three.item() == pytest.approx(one.item(), rel=1e-12)
    assert torch.allclose(g_one, g_three, rtol=1e-12, atol=1e-15)


def test_large_tau_gradient_approaches_logit_difference_over_classes():
    # Hinton et al. 2015 Sec. 2.1: for zero-mean logits and large T, d(T^2 L_KD)/dz_i ~ (z_i - v_i) / C.
    c = 10
    s = rand_logits(1, c, 60, scale=1.0)
    t = rand_logits(1, c, 61, scale=1.0)
    s, t = s - s.mean(), t - t.mean()
    s.requires_grad_()
    expected = (np_(s) - np_(t)) / c
    tol = 1e-3 * np.abs(expected).max()
    loss = build_loss(LossConfig(name="kd", alpha=0.0, tau=2000.0))
    (grad,) = torch.autograd.grad(loss(s, [t], make_batch([0]))["loss"], s)
    assert np.abs(grad.numpy() - expected).max() < tol
    # ... which is a high-temperature limit: at tau = 1 the gradient is something else.
    loss1 = build_loss(LossConfig(name="kd", alpha=0.0, tau=1.0))
    (grad1,) = torch.autograd.grad(loss1(s, [t], make_batch([0]))["loss"], s)
    assert np.abs(grad1.numpy() - expected).max() > 100 * tol


def test_mean_probs_ensemble_is_fidelity_study_ensemble():
    s, t0, t1 = rand_logits(3, 5, 70), rand_logits(3, 5, 71), rand_logits(3, 5, 72)
    out = build_loss(LossConfig(name="pure_kd", tau=4.0, ensemble="mean_probs"))(s, [t0, t1], make_batch([0, 1, 2]))
    ens_logits = np.log((ref.softmax(np_(t0)) + ref.softmax(np_(t1))) / 2)  # log of the mean softmax
    assert out["loss"].item() == pytest.approx(ref.kd_ce(np_(s), ens_logits, 4.0).mean(), rel=1e-10)
    assert "kd0" not in out


def test_mean_logits_ensemble():
    s, t0, t1 = rand_logits(3, 5, 73), rand_logits(3, 5, 74), rand_logits(3, 5, 75)
    cfg = LossConfig(name="kd", alpha=0.0, tau=2.0, ensemble="mean_logits")
    out = build_loss(cfg)(s, [t0, t1], make_batch([0, 1, 2]))
    assert out["kd"].item() == pytest.approx(ref.kd_ce(np_(s), (np_(t0) + np_(t1)) / 2, 2.0).mean(), rel=1e-10)


def test_pure_kd_has_no_label_term():
    s, t = rand_logits(4, 5, 80), rand_logits(4, 5, 81)
    labels = [0, 1, 2, 3]
    out = build_loss(LossConfig(name="pure_kd", tau=4.0, ce_weight=5.0))(s, [t], make_batch(labels))
    assert out["loss"].item() == pytest.approx(ref.kd_ce(np_(s), np_(t), 4.0).mean(), rel=1e-10)
    assert out["ce"].item() == pytest.approx(ref.ce(np_(s), labels).mean(), rel=1e-10)  # logged only


# ---------------------------------------------------------------- logit standardisation


def test_standardized_kd_golden():
    s, t = rand_logits(4, 6, 90), rand_logits(4, 6, 91)
    labels = [5, 4, 3, 2]
    cfg = LossConfig(name="standardized_kd", tau=2.0, ce_weight=0.1, kd_weight=0.9, kd_form="kl")
    out = build_loss(cfg)(s, [t], make_batch(labels))
    kd = ref.kd_kl(ref.zscore(np_(s)), ref.zscore(np_(t)), 2.0).mean()
    assert out["kd"].item() == pytest.approx(kd, rel=1e-9)
    assert out["loss"].item() == pytest.approx(0.1 * ref.ce(np_(s), labels).mean() + 0.9 * kd, rel=1e-9)


def test_standardized_kd_invariant_to_shift_and_scale():
    s, t = rand_logits(5, 8, 92), rand_logits(5, 8, 93)
    loss = build_loss(LossConfig(name="standardized_kd", tau=2.0, alpha=0.0))
    b = make_batch([0] * 5)
    base = loss(s, [t], b)["loss"].item()
    shift = torch.tensor([[3.0], [-1.0], [0.5], [10.0], [-7.0]], dtype=torch.float64)
    assert loss(s, [t * 3.7 + shift], b)["loss"].item() == pytest.approx(base, rel=1e-6)
    assert loss(s * 0.2 - shift, [t], b)["loss"].item() == pytest.approx(base, rel=1e-6)
    # plain KD is not invariant: the test would catch a loss that ignored the logits' scale anyway.
    plain = build_loss(LossConfig(name="kd", tau=2.0, alpha=0.0))
    assert plain(s, [t * 3.7 + shift], b)["loss"].item() != pytest.approx(plain(s, [t], b)["loss"].item(), rel=1e-3)


# ---------------------------------------------------------------- gradients, dtypes, masks


@pytest.mark.parametrize(
    "cfg",
    [
        LossConfig(name="ensemble_kd", tau=3.0, ce_weight=0.4, kd_weight=0.6),
        LossConfig(name="ensemble_kd", tau=3.0, kd_form="kl", ensemble="mean_probs"),
        LossConfig(name="pure_kd", tau=2.0),
        LossConfig(name="standardized_kd", tau=2.0, kd_form="kl"),
        LossConfig(name="ce", label_smoothing=0.1),
    ],
    ids=lambda c: f"{c.name}-{c.kd_form}-{c.ensemble}",
)
def test_gradcheck_float64(cfg):
    loss = build_loss(cfg)
    t0, t1 = rand_logits(3, 5, 100), rand_logits(3, 5, 101)
    b = make_batch([0, 3, 4])
    s = rand_logits(3, 5, 102).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss(x, [t0, t1], b)["loss"], (s,), eps=1e-6, atol=1e-7)


def test_bf16_inputs_are_computed_in_fp32():
    s32, t32 = rand_logits(8, 10, 110, dtype=torch.float32), rand_logits(8, 10, 111, dtype=torch.float32)
    s16 = s32.bfloat16().requires_grad_()
    t16 = t32.bfloat16()
    labels = list(range(8))
    out = build_loss(LossConfig(name="kd", tau=4.0, alpha=0.5))(s16, [t16], make_batch(labels))
    assert out["loss"].dtype == torch.float32
    s_ref, t_ref = np_(s16.float()), np_(t16.float())  # the same bf16-rounded values, in float64
    expected = 0.5 * ref.ce(s_ref, labels).mean() + 0.5 * ref.kd_ce(s_ref, t_ref, 4.0).mean()
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    out["loss"].backward()
    assert s16.grad is not None and s16.grad.dtype == torch.bfloat16


def test_padding_samples_do_not_contribute():
    s, t = rand_logits(5, 4, 120), rand_logits(5, 4, 121)
    labels = [0, 1, 2, 3, 0]
    valid = [True, False, True, True, False]
    s_pad, t_pad = s.clone(), t.clone()
    s_pad[1], s_pad[4] = 1e4, -1e4  # garbage in padding rows must not matter
    loss = build_loss(LossConfig(name="ensemble_kd", tau=2.0, ce_weight=0.5, kd_weight=0.5))
    out = loss(s_pad, [t_pad], make_batch(labels, valid=valid))
    keep = [0, 2, 3]
    expected = 0.5 * ref.ce(np_(s)[keep], [0, 2, 3]).mean() + 0.5 * ref.kd_ce(np_(s)[keep], np_(t)[keep], 2.0).mean()
    assert out["loss"].item() == pytest.approx(expected, rel=1e-10)
    s_pad.requires_grad_()
    (g,) = torch.autograd.grad(loss(s_pad, [t_pad], make_batch(labels, valid=valid))["loss"], s_pad)
    assert torch.all(g[[1, 4]] == 0)


def test_all_padding_gives_zero_loss_with_grad():
    s = rand_logits(2, 3, 130).requires_grad_()
    out = build_loss(LossConfig(name="kd"))(s, [rand_logits(2, 3, 131)], make_batch([0, 1], valid=[False, False]))
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert torch.all(s.grad == 0)


# ---------------------------------------------------------------- bad input


def test_class_count_mismatch_names_teacher():
    with pytest.raises(ConfigError, match=r"teacher 1 gives 7 classes but the student gives 5"):
        build_loss(LossConfig(name="kd"))(
            rand_logits(2, 5, 0), [rand_logits(2, 5, 1), rand_logits(2, 7, 2)], make_batch([0, 1])
        )


def test_sample_count_mismatch():
    with pytest.raises(ConfigError, match="teacher 0 gives logits for 3 samples but the student for 2"):
        build_loss(LossConfig(name="kd"))(rand_logits(2, 5, 0), [rand_logits(3, 5, 1)], make_batch([0, 1]))


def test_label_out_of_range():
    with pytest.raises(ConfigError, match=r"label 9 out of range for a 5-class student in .*sample ids \[101\]"):
        build_loss(LossConfig(name="ce"))(rand_logits(2, 5, 0), [], make_batch([0, 9]))
    with pytest.raises(ConfigError, match="label -1 out of range"):
        build_loss(LossConfig(name="ce"))(rand_logits(2, 5, 0), [], make_batch([-1, 0]))


def test_nan_student_logits_name_student_and_samples():
    s = rand_logits(3, 4, 0)
    s[1, 2] = float("nan")
    with pytest.raises(
        NonFiniteError, match=r"student logits contain NaN for 1 of 3 samples .*epoch 3, sample ids \[101\]"
    ):
        build_loss(LossConfig(name="kd"))(s, [rand_logits(3, 4, 1)], make_batch([0, 1, 2]))


def test_inf_teacher_logits_name_teacher():
    t = rand_logits(3, 4, 1)
    t[2, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"teacher 1 logits contain Inf .*sample ids \[7\]"):
        build_loss(LossConfig(name="kd"))(
            rand_logits(3, 4, 0), [rand_logits(3, 4, 2), t], make_batch([0, 1, 2], index=[5, 6, 7])
        )


def test_finite_check_can_be_disabled():
    t = rand_logits(2, 4, 1)
    t[0, 0] = float("nan")
    out = build_loss(LossConfig(name="kd", check_finite=False))(rand_logits(2, 4, 0), [t], make_batch([0, 1]))
    assert math.isnan(out["loss"].item())
    with pytest.raises(NonFiniteError, match="loss term 'loss'"):
        check_loss_finite(out, make_batch([0, 1]))


def test_missing_teachers():
    with pytest.raises(ConfigError, match="needs at least 1 teacher"):
        build_loss(LossConfig(name="ensemble_kd"))(rand_logits(2, 4, 0), [], make_batch([0, 1]))
