"""Ensemble reductions against numpy, from the studies' formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpckd.losses import LossConfig
from hpckd.losses.config import validated
from hpckd.teachers import ENSEMBLE_MODES, REDUCTIONS, ensemble_distribution, mean_logits, mean_probs


def _members(m: int, n: int = 6, c: int = 5, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, generator=g) * (k + 1) for k in range(m)]


def _np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("m", [1, 2, 3, 7])
def test_mean_logits_is_the_arithmetic_mean(m):
    z = _members(m)
    expected = np.mean([t.double().numpy() for t in z], axis=0)
    got = mean_logits(z)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m", [1, 2, 3, 7])
def test_mean_probs_is_the_log_of_the_mean_softmax(m):
    """Fidelity study Sec. 3: z_t = log(1/m sum_i softmax(z_i))."""
    z = _members(m, seed=m)
    expected = np.log(np.mean([_np_softmax(t.double().numpy()) for t in z], axis=0))
    got = mean_probs(z)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.exp(got.numpy()).sum(-1), 1.0, rtol=1e-5)  # a proper distribution


def test_float64_reductions_for_metrics():
    """The metrics reduce in float64: the result matches numpy to float64 precision, not fp32's."""
    z = [t.double() * 3 for t in _members(3, seed=5)]
    want_probs = np.log(np.mean([_np_softmax(t.numpy()) for t in z], axis=0))
    want_logits = np.mean([t.numpy() for t in z], axis=0)
    got_probs, got_logits = mean_probs(z, dtype=torch.float64), mean_logits(z, dtype=torch.float64)
    assert got_probs.dtype == got_logits.dtype == torch.float64
    np.testing.assert_allclose(got_probs.numpy(), want_probs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_logits.numpy(), want_logits, rtol=1e-12, atol=1e-12)
    # a stacked (m, N, C) tensor is the same ensemble as the list of its members
    assert torch.equal(mean_probs(torch.stack(z), dtype=torch.float64), got_probs)


def test_mean_probs_is_stable_for_extreme_logits():
    z = [torch.tensor([[1000.0, 0.0, -1000.0]]), torch.tensor([[-1000.0, 0.0, 1000.0]])]
    got = mean_probs(z)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got[0, [0, 2]].numpy(), np.log([0.5, 0.5]), rtol=1e-6)
    assert got[0, 1] < -900  # log(1/2 e^-1000) underflows softmax but not log-space


def test_with_one_teacher_all_modes_give_the_same_softened_distribution():
    """per_teacher_loss distils from z itself; both reductions of {z} soften to the same distribution."""
    (z,) = _members(1)
    tau = 4.0
    expected = _np_softmax(z.double().numpy() / tau)
    for t in (mean_logits([z]), mean_probs([z]), z):
        np.testing.assert_allclose(torch.softmax(t / tau, -1).numpy(), expected, rtol=1e-5, atol=1e-7)


def test_ensemble_distribution_defaults_to_mean_probs():
    z = _members(3)
    assert torch.equal(ensemble_distribution(z), mean_probs(z))
    assert torch.equal(ensemble_distribution(z, "mean_logits"), mean_logits(z))
    assert torch.equal(ensemble_distribution(z, "mean_logits", torch.float64), mean_logits(z, torch.float64))
    with pytest.raises(ValueError, match="choose one of mean_probs, mean_logits"):
        ensemble_distribution(z, "per_teacher_loss")  # a loss mode, not a reduction


def test_one_set_of_mode_names():
    """loss.ensemble takes every mode (Eq. 8's per_teacher_loss by default); metrics only the two reductions."""
    assert set(ENSEMBLE_MODES) == {"per_teacher_loss", *REDUCTIONS} and set(REDUCTIONS) == {"mean_probs", "mean_logits"}
    assert LossConfig().ensemble == "per_teacher_loss"
    for mode in ENSEMBLE_MODES:
        assert validated(LossConfig(ensemble=mode)).ensemble == mode


def test_bad_modes_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="choose one of mean_probs, mean_logits"):
        ensemble_distribution(_members(2), "median")
    with pytest.raises(ValueError, match="at least one"):
        mean_logits([])
    with pytest.raises(ValueError, match="differ in shape"):
        mean_probs([torch.zeros(2, 3), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        mean_probs([torch.zeros(3), torch.zeros(3)])


def test_bf16_inputs_are_combined_in_fp32():
    z = [t.bfloat16() for t in _members(2)]
    got = mean_logits(z)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), (z[0].float() + z[1].float()).numpy() / 2, rtol=1e-6)
