"""The numpy references of the loss tests (``tests/helpers.py``, written from the papers' formulas, not from hpckd
code), pinned to values worked out by hand."""

from __future__ import annotations

import math

import numpy as np

from tests.helpers import ce, entropy, kd_ce, kd_kl, softmax, zscore


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
