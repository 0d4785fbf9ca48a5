"""Tests of the response-based study's tools: soft-target replacement/manipulation (Eqs. 1-5), WSL,
consistent knowledge mining, and the recipes (alpha convention, two-stage schedule)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from hpckd.errors import ConfigError
from hpckd.losses import LossConfig, TargetsConfig, WSLConfig, build_loss
from hpckd.losses import targets as T
from hpckd.losses.recipes import efficient_distillation_stages, recipe, stage_at
from tests import helpers as ref
from tests.helpers import label_batch as make_batch, np_, rand_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def logits_of(probs) -> torch.Tensor:
    return torch.log(torch.tensor(probs, dtype=torch.float64))


# ---------------------------------------------------------------- targets, Eqs. 1-5, by the printed formulas


def np_rescaled(p_rest, p_label, labels):
    """y_k = p_label_k; y_i = p_rest_i (1 - p_label_k) / (1 - p_rest_k) for i != k (the pattern of Eqs. 1-2)."""
    out = p_rest.copy()
    for n, k in enumerate(labels):
        out[n] *= (1 - p_label[n, k]) / (1 - p_rest[n, k])
        out[n, k] = p_label[n, k]
    return out


def np_partial(p_weak, p_strong, labels):
    """Eq. 1: y_i = y+_i (1 - y-_k) / (1 - y+_k), i != k; y_k = y-_k."""
    return np_rescaled(p_strong, p_weak, labels)


def np_confidence(p_weak, p_strong, labels):
    """Eq. 2: y_i = y-_i (1 - y+_k) / (1 - y-_k), i != k; y_k = y+_k."""
    return np_rescaled(p_weak, p_strong, labels)


@pytest.mark.parametrize(
    "rule, expected, rtol",
    [
        ("partial", np_partial, 1e-10),
        ("confidence", np_confidence, 1e-10),
        ("full", lambda p_weak, p_strong, labels: p_strong, 1e-12),
    ],
)
def test_replacements_match_equations_1_and_2(rule, expected, rtol):
    weak, strong = rand_logits(5, 6, 0), rand_logits(5, 6, 1)
    labels = torch.tensor([0, 5, 2, 2, 1])
    pw, ps = ref.softmax(np_(weak)), ref.softmax(np_(strong))
    got = T.REPLACEMENTS[rule](weak, strong, labels).numpy()
    assert np.allclose(got, expected(pw, ps, labels.tolist()), rtol=rtol)
    assert np.allclose(got.sum(axis=1), 1.0)


def test_label_smoothing_eq3_and_code_forms_by_hand():
    labels = torch.tensor([2])
    eq3 = T.label_smoothing_target(labels, 4, 0.7, "eq3", torch.float64).numpy()
    code = T.label_smoothing_target(labels, 4, 0.7, "code", torch.float64).numpy()
    assert np.allclose(eq3, [[0.1, 0.1, 0.7, 0.1]])
    assert np.allclose(code, [[0.0003, 0.0003, 0.7003, 0.0003]])  # the public code's (1 - t) / 1000, any C


def test_amplification_by_hand_and_capped_at_one():
    z = logits_of([[0.5, 0.3, 0.2]])
    got = T.amplification(z, torch.tensor([0]), 0.2).numpy()
    # y_k = 0.7; the rest keeps its 3:2 shape and sums to 0.3.
    assert np.allclose(got, [[0.7, 0.18, 0.12]])
    capped = T.amplification(z, torch.tensor([0]), 0.8).numpy()
    assert np.allclose(capped, [[1.0, 0.0, 0.0]])


def test_subsets_by_hand():
    teacher = logits_of([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.2, 0.7, 0.1]])
    student = logits_of([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    labels = torch.tensor([0, 0, 0, 0])
    # sample 0: teacher correct, student more confident -> reg & correct; 1: correct, not reg;
    # 2: teacher wrong, student more confident -> reg, not correct; 3: teacher wrong, student less confident.
    want = {
        "all": [1, 1, 1, 1],
        "correct": [1, 1, 0, 0],
        "not_correct": [0, 0, 1, 1],
        "reg": [1, 0, 1, 0],
        "reg_correct": [1, 0, 0, 0],
    }
    for subset, mask in want.items():
        assert T.subset_mask(subset, teacher, student, labels).int().tolist() == mask, subset


# ---------------------------------------------------------------- soft_target_kd


def test_soft_target_kd_confidence_replacement_on_correct_subset():
    weak, strong, s = rand_logits(6, 5, 10), rand_logits(6, 5, 11), rand_logits(6, 5, 12)
    labels = weak.argmax(dim=1).clone()
    labels[[1, 4]] = (labels[[1, 4]] + 1) % 5  # the weak teacher is wrong on samples 1 and 4
    rule = TargetsConfig(replace="confidence", subset="correct")
    cfg = LossConfig(name="soft_target_kd", tau=2.0, alpha=0.0, targets=rule)
    out = build_loss(cfg)(s, [weak, strong], make_batch(labels))
    pw, ps = ref.softmax(np_(weak), 2.0), ref.softmax(np_(strong), 2.0)
    target = pw.copy()
    replaced = np_confidence(pw, ps, labels.tolist())
    for n in (0, 2, 3, 5):
        target[n] = replaced[n]
    assert out["loss"].item() == pytest.approx(ref.kd_probs(np_(s), target, 2.0).mean(), rel=1e-10)
    assert out["subset_frac"].item() == pytest.approx(4 / 6)


def test_soft_target_kd_label_smoothing_on_reg_correct():
    """The response_analysis recipe (tau 1, no CE, label smoothing on reg & correct samples), at t = 0.9."""
    teacher = logits_of([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1]])
    student = logits_of([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3]])
    base = recipe("response_analysis")
    cfg = dataclasses.replace(base, targets=dataclasses.replace(base.targets, smoothing=0.9))
    out = build_loss(cfg)(student, [teacher], make_batch([0, 0]))
    target = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1]])  # sample 0 smoothed (Eq. 3), sample 1 unchanged
    assert out["kd"].item() == pytest.approx(ref.kd_probs(np_(student), target, 1.0).mean(), rel=1e-10)


def test_soft_target_kd_without_changes_is_plain_kd():
    t, s = rand_logits(4, 5, 13), rand_logits(4, 5, 14)
    out = build_loss(LossConfig(name="soft_target_kd", tau=3.0, alpha=0.0))(s, [t], make_batch([0, 1, 2, 3]))
    assert out["loss"].item() == pytest.approx(ref.kd_ce(np_(s), np_(t), 3.0).mean(), rel=1e-10)


def test_student_amplification_uses_student_distribution():
    t = logits_of([[0.2, 0.5, 0.3]])
    s = logits_of([[0.5, 0.3, 0.2]])
    cfg = LossConfig(
        name="soft_target_kd", tau=1.0, alpha=0.0,
        targets=TargetsConfig(manipulate="student_amplification", amplify_delta=0.2),
    )
    out = build_loss(cfg)(s, [t], make_batch([0]))
    assert out["kd"].item() == pytest.approx(ref.kd_probs(np_(s), [[0.7, 0.18, 0.12]], 1.0)[0], rel=1e-10)


@pytest.mark.parametrize("manip", ["label_smoothing", "teacher_amplification"])
def test_soft_target_kd_gradcheck(manip):
    t = rand_logits(3, 4, 15)
    cfg = LossConfig(name="soft_target_kd", tau=2.0, ce_weight=0.3, kd_weight=0.7,
                     targets=TargetsConfig(manipulate=manip))
    loss = build_loss(cfg)
    s = rand_logits(3, 4, 16).requires_grad_()
    b = make_batch([0, 1, 2])
    assert torch.autograd.gradcheck(lambda x: loss(x, [t], b)["loss"], (s,), eps=1e-6, atol=1e-7)


def test_soft_target_kd_bad_configs():
    with pytest.raises(ConfigError, match="one at a time"):
        both = TargetsConfig(replace="full", manipulate="label_smoothing")
        build_loss(LossConfig(name="soft_target_kd", targets=both))
    with pytest.raises(ConfigError, match="at least 2 teacher"):
        build_loss(LossConfig(name="soft_target_kd", targets=TargetsConfig(replace="full")))(
            rand_logits(2, 3, 0), [rand_logits(2, 3, 1)], make_batch([0, 1])
        )
    with pytest.raises(ConfigError, match="'loss.targets.subset' is 'hard'"):
        build_loss(LossConfig(name="soft_target_kd", targets=TargetsConfig(subset="hard")))


# ---------------------------------------------------------------- WSL


def np_wsl_weight(s, t, labels, tau_s, tau_t, eps=0.0):
    ce_s = -np.log(ref.softmax(s, tau_s)[np.arange(len(labels)), labels])
    ce_t = -np.log(ref.softmax(t, tau_t)[np.arange(len(labels)), labels])
    return 1.0 - np.exp(-np.maximum(ce_s / (ce_t + eps), 0.0))


@pytest.mark.parametrize("weight_tau, tau_s, tau_t, eps", [("tau", 2.0, 2.0, 0.0), ("one", 1.0, 1.0, 1e-7)])
def test_wsl_golden(weight_tau, tau_s, tau_t, eps):
    s, t = rand_logits(5, 6, 20), rand_logits(5, 6, 21)
    labels = [0, 1, 2, 3, 4]
    cfg = LossConfig(name="wsl", tau=2.0, ce_weight=1.0, kd_weight=0.5, label_smoothing=0.1,
                     wsl=WSLConfig(weight_tau=weight_tau))
    out = build_loss(cfg)(s, [t], make_batch(labels))
    w = np_wsl_weight(np_(s), np_(t), labels, tau_s, tau_t, eps)
    kd = (w * ref.kd_ce(np_(s), np_(t), 2.0)).mean()
    ce = ref.ce(np_(s), labels, eps=0.1).mean()
    assert out["kd"].item() == pytest.approx(kd, rel=1e-10)
    assert out["wsl_weight"].item() == pytest.approx(w.mean(), rel=1e-10)
    assert out["loss"].item() == pytest.approx(ce + 0.5 * kd, rel=1e-10)


def test_wsl_weight_is_a_constant_for_the_gradient():
    # d/dz_s [ w tau^2 CE(p_t, sigma(z_s/tau)) ] = w tau (sigma(z_s/tau) - p_t), with w held fixed (Zhou et al.).
    s, t = rand_logits(3, 4, 22).requires_grad_(), rand_logits(3, 4, 23)
    labels = [0, 1, 2]
    out = build_loss(LossConfig(name="wsl", tau=2.0, ce_weight=0.0, kd_weight=1.0))(s, [t], make_batch(labels))
    (g,) = torch.autograd.grad(out["loss"], s)
    w = np_wsl_weight(np_(s), np_(t), labels, 2.0, 2.0)
    expected = w[:, None] * 2.0 * (ref.softmax(np_(s), 2.0) - ref.softmax(np_(t), 2.0)) / 3
    assert np.allclose(g.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_wsl_weight_small_for_regularisation_samples():
    # The student is far more confident on the label than the teacher -> CE_s << CE_t -> w near 0.
    s = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]], dtype=torch.float64)
    from hpckd.losses.wsl import wsl_weight

    w = wsl_weight(s, t, torch.tensor([0, 0]), 1.0, 1.0).numpy()
    assert w[0] < 0.01 and w[1] > 0.99


# ---------------------------------------------------------------- consistent knowledge mining


def test_ckm_by_hand():
    # Sample 0: teacher correct (class 0), student more confident on 0 -> label-smoothed CE at t = 0.99.
    # Sample 1: teacher wrong -> plain KD. Sample 2: teacher correct, student less confident -> plain KD.
    t = logits_of([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    s = logits_of([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.4, 0.3, 0.3]])
    labels = [0, 0, 0]
    out = build_loss(LossConfig(name="ckm", tau=1.0, teacher_tau=0.7, ce_weight=0.0, kd_weight=1.0))(
        s, [t], make_batch(labels)
    )
    smoothed = np.array([0.99, 0.005, 0.005])
    per = [
        -(smoothed * ref.log_softmax(np_(s))[0]).sum(),
        ref.kd_ce(np_(s)[1:2], np_(t)[1:2], 1.0, tau_t=0.7)[0],
        ref.kd_ce(np_(s)[2:3], np_(t)[2:3], 1.0, tau_t=0.7)[0],
    ]
    assert out["loss"].item() == pytest.approx(np.mean(per), rel=1e-10)
    assert out["mined_frac"].item() == pytest.approx(1 / 3)


def test_ckm_reads_the_label_smoothed_target_from_loss_targets():
    """Eq. 3 with t = loss.targets.smoothing in both forms: eq3 (others (1-t)/(C-1)) and code (t onehot + (1-t)/1000)."""
    t = logits_of([[0.6, 0.3, 0.1]])
    s = logits_of([[0.9, 0.05, 0.05]])  # teacher correct and less confident than the student: mined
    for form, smoothed in (("eq3", [0.9, 0.05, 0.05]), ("code", [0.9 + 0.1 / 1000, 0.1 / 1000, 0.1 / 1000])):
        cfg = LossConfig(name="ckm", tau=1.0, ce_weight=0.0, targets=TargetsConfig(smoothing=0.9, smoothing_form=form))
        out = build_loss(cfg)(s, [t], make_batch([0]))
        assert out["mined_frac"].item() == 1.0
        assert out["loss"].item() == pytest.approx(-(np.array(smoothed) * ref.log_softmax(np_(s))[0]).sum(), rel=1e-10)


def test_recipes_do_not_share_their_subsections():
    one = recipe("efficient_stage2")
    one.targets.smoothing = 0.5
    assert recipe("efficient_stage2").targets.smoothing == 0.99


def test_ckm_mining_uses_teacher_temperature():
    # With tau_t = 0.7 the teacher sharpens from 0.6 to 0.69 on class 0, above the student's 0.65: not mined;
    # at tau_t = 1 the same sample is mined (0.6 < 0.65).
    t = logits_of([[0.6, 0.3, 0.1]])
    s = logits_of([[0.65, 0.25, 0.1]])
    sharp = ref.softmax(np_(t), 0.7)[0, 0]
    assert sharp > 0.65
    mk = lambda tt: build_loss(LossConfig(name="ckm", tau=1.0, teacher_tau=tt, ce_weight=0.0))(s, [t], make_batch([0]))
    assert mk(0.7)["mined_frac"].item() == 0.0
    assert mk(1.0)["mined_frac"].item() == 1.0


# ---------------------------------------------------------------- recipes


def test_recipes_translate_each_papers_alpha():
    att = recipe("attention_study")  # "hard label weight alpha = 0.2", tau = 10
    assert (att.ce_weight, att.kd_weight, att.tau) == (0.2, 0.8, 10.0)
    aug = recipe("augmentation_study")  # (1 - a) CE + a KL, a = 0.9 on the KD side
    assert (aug.ce_weight, aug.kd_weight, aug.kd_form, aug.name) == (
        pytest.approx(0.1),
        pytest.approx(0.9),
        "kl",
        "kd_da",
    )
    fid = recipe("fidelity_study")  # alpha = 0
    assert (fid.name, fid.ce_weight, fid.kd_weight, fid.ensemble) == ("pure_kd", 0.0, 1.0, "mean_probs")
    for name in ("attention_study", "augmentation_study", "fidelity_study", "efficient_stage1", "efficient_stage2"):
        assert build_loss(recipe(name)).name == recipe(name).name
    with pytest.raises(ConfigError, match="did you mean 'fidelity_study'"):
        recipe("fidelity_studdy")


def test_efficient_distillation_two_stage_schedule():
    stages = efficient_distillation_stages(300)
    assert [(s.name, s.epochs, s.teacher) for s in stages] == [("stage1", 240, "first"), ("stage2", 60, "second")]
    one, two = stages
    assert (one.loss.name, one.loss.tau, one.loss.label_smoothing) == ("wsl", 2.0, 0.1)
    assert (two.loss.name, two.loss.tau, two.loss.teacher_tau, two.loss.targets.smoothing) == ("ckm", 1.0, 0.7, 0.99)
    assert "optim.weight_decay=4e-05" in one.overrides and "optim.lr=0.5" in one.overrides
    assert "optim.weight_decay=0.0" in two.overrides and "optim.lr=0.05" in two.overrides
    assert stage_at(stages, 0).name == "stage1" and stage_at(stages, 239).name == "stage1"
    assert stage_at(stages, 240).name == "stage2" and stage_at(stages, 400).name == "stage2"
    assert [s.epochs for s in efficient_distillation_stages(10)] == [8, 2]
    from hpckd.train.experiment import load_experiment

    cfg = load_experiment(overrides=list(two.overrides))  # the overrides are valid experiment-config keys
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (0.05, 0.0)
    assert math.isclose(load_experiment(overrides=list(one.overrides)).optim.weight_decay, 4e-5)


def test_ckm_gradcheck():
    t = logits_of([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3]])
    s = logits_of([[0.9, 0.05, 0.05], [0.3, 0.4, 0.3], [0.2, 0.2, 0.6]]).requires_grad_()
    loss = build_loss(LossConfig(name="ckm", tau=1.0, teacher_tau=0.7, ce_weight=0.2, kd_weight=1.0))
    b = make_batch([0, 1, 0])
    assert loss(s, [t], b)["mined_frac"].item() == pytest.approx(1 / 3)  # both branches are exercised
    assert torch.autograd.gradcheck(lambda x: loss(x, [t], b)["loss"], (s,), eps=1e-6, atol=1e-7)


def test_soft_target_kd_kl_form_is_zero_when_student_matches_target():
    t = rand_logits(3, 5, 30)
    loss = build_loss(LossConfig(name="soft_target_kd", tau=2.0, alpha=0.0, kd_form="kl"))
    assert loss(t.clone(), [t], make_batch([0, 1, 2]))["kd"].item() == pytest.approx(0.0, abs=1e-12)
    s = rand_logits(3, 5, 31)
    assert loss(s, [t], make_batch([0, 1, 2]))["kd"].item() == pytest.approx(
        ref.kd_kl(np_(s), np_(t), 2.0).mean(), rel=1e-10
    )
