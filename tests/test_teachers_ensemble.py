"""Ensemble reductions against numpy, from the studies' formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpckd.errors import ConfigError
from hpckd.teachers import EnsembleConfig, combine, ensemble_distribution, mean_logits, mean_probs


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
    (got,) = combine(z, "mean_logits")
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m", [1, 2, 3, 7])
def test_mean_probs_is_the_log_of_the_mean_softmax(m):
    """Fidelity study Sec. 3: z_t = log(1/m sum_i softmax(z_i))."""
    z = _members(m, seed=m)
    expected = np.log(np.mean([_np_softmax(t.double().numpy()) for t in z], axis=0))
    (got,) = combine(z, "mean_probs")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.exp(got.numpy()).sum(-1), 1.0, rtol=1e-5)  # a proper distribution


def test_mean_probs_is_stable_for_extreme_logits():
    z = [torch.tensor([[1000.0, 0.0, -1000.0]]), torch.tensor([[-1000.0, 0.0, 1000.0]])]
    got = mean_probs(z)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got[0, [0, 2]].numpy(), np.log([0.5, 0.5]), rtol=1e-6)
    assert got[0, 1] < -900  # log(1/2 e^-1000) underflows softmax but not log-space


def test_per_teacher_loss_returns_the_list_unchanged():
    """Attention study Eq. 8: the loss averages one KD term per teacher, so nothing is combined here."""
    z = _members(3)
    got = combine(z, "per_teacher_loss")
    assert len(got) == 3 and all(a is b for a, b in zip(got, z))


def test_with_one_teacher_all_modes_give_the_same_softened_distribution():
    (z,) = _members(1)
    tau = 4.0
    expected = _np_softmax(z.double().numpy() / tau)
    for mode in ("mean_logits", "mean_probs", "per_teacher_loss"):
        (t,) = combine([z], mode)
        np.testing.assert_allclose(torch.softmax(t / tau, -1).numpy(), expected, rtol=1e-5, atol=1e-7)


def test_metrics_reduction_defaults_to_mean_probs():
    z = _members(3)
    assert EnsembleConfig().metrics_mode == "mean_probs"
    assert torch.equal(ensemble_distribution(z), mean_probs(z))
    assert torch.equal(ensemble_distribution(z, "mean_logits"), mean_logits(z))
    with pytest.raises(ConfigError, match="metrics_mode"):
        ensemble_distribution(z, "per_teacher_loss")


def test_bad_modes_and_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="choose one of mean_logits, mean_probs, per_teacher_loss"):
        combine(_members(2), "median")
    with pytest.raises(ConfigError, match="ensemble.mode"):
        EnsembleConfig(mode="sum")
    with pytest.raises(ValueError, match="at least one"):
        combine([], "mean_logits")
    with pytest.raises(ValueError, match="differ in shape"):
        combine([torch.zeros(2, 3), torch.zeros(2, 4)], "per_teacher_loss")


def test_bf16_inputs_are_combined_in_fp32():
    z = [t.bfloat16() for t in _members(2)]
    (got,) = combine(z, "mean_logits")
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), (z[0].float() + z[1].float()).numpy() / 2, rtol=1e-6)
