"""Independent numpy references for the loss tests (written from the papers' formulas, not from hpckd code).

Imported by the other ``test_losses*`` files, with the inputs they share (:func:`rand_logits`, :func:`make_batch`);
the tests here pin the references themselves to values worked out by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hpckd.data.batch import Batch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: intra-op threads only add contention on the 2-core CI machine (ms per op when loaded)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rand_logits(n: int, c: int, seed: int, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g) * scale).to(dtype)


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def make_batch(labels, valid=None, epoch: int = 3, index=None) -> Batch:
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = labels.numel()
    return Batch(
        views={"student": torch.zeros(n, 3, 2, 2)},
        labels=labels,
        index=torch.arange(100, 100 + n) if index is None else torch.as_tensor(index),
        epoch=epoch,
        valid=None if valid is None else torch.as_tensor(valid, dtype=torch.bool),
    )


def softmax(z, tau: float = 1.0) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / tau
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(z, tau: float = 1.0) -> np.ndarray:
    return np.log(softmax(z, tau))


def ce(zs, labels, eps: float = 0.0) -> np.ndarray:
    """Per-sample CE with label smoothing eps: target (1 - eps) onehot + eps / C."""
    zs = np.asarray(zs, dtype=np.float64)
    c = zs.shape[1]
    target = np.full_like(zs, eps / c)
    target[np.arange(len(labels)), labels] += 1.0 - eps
    return -(target * log_softmax(zs)).sum(axis=1)


def kd_ce(zs, zt, tau: float, tau_t: float | None = None) -> np.ndarray:
    """-tau^2 sum_c softmax(zt/tau_t) log softmax(zs/tau) (attention study Eq. 7)."""
    pt = softmax(zt, tau_t or tau)
    return -(tau**2) * (pt * log_softmax(zs, tau)).sum(axis=1)


def kd_kl(zs, zt, tau: float, tau_t: float | None = None) -> np.ndarray:
    pt = softmax(zt, tau_t or tau)
    return tau**2 * (pt * (np.log(pt) - log_softmax(zs, tau))).sum(axis=1)


def kd_probs(zs, target, tau: float) -> np.ndarray:
    return -(tau**2) * (np.asarray(target) * log_softmax(zs, tau)).sum(axis=1)


def entropy(z, tau: float = 1.0) -> np.ndarray:
    p = softmax(z, tau)
    return -(p * np.log(p)).sum(axis=1)


def zscore(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, ddof=1, keepdims=True) + 1e-7)


def test_reference_hand_values():
    # teacher (ln 3, 0) -> p_t = (3/4, 1/4); student (0, 0) -> p_s = (1/2, 1/2).
    zs, zt = [[0.0, 0.0]], [[math.log(3.0), 0.0]]
    assert np.allclose(softmax(zt), [[0.75, 0.25]])
    assert np.isclose(kd_ce(zs, zt, 1.0)[0], math.log(2.0))
    assert np.isclose(kd_kl(zs, zt, 1.0)[0], 0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert np.isclose(entropy(zt)[0], -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert np.isclose(ce([[0.0, 0.0, 0.0]], [1])[0], math.log(3.0))


def test_reference_zscore_hand_value():
    # (1, 2, 3): mean 2, sample std 1 -> (-1, 0, 1)
    assert np.allclose(zscore([[1.0, 2.0, 3.0]]), [[-1.0, 0.0, 1.0]], atol=1e-6)
