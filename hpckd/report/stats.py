"""Statistics across trials, from scipy: Pearson and Spearman correlations, Welch's and paired t-tests, and the
attention study's A/B-test p-value (Eq. 9)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as sstats


def _clean_pairs(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep], b[keep]


def correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Pearson's r and Spearman's rho with their two-sided p-values over the pairs where both values exist
    (augmentation study Fig. 4: T. stddev vs S. test loss; attention study Figs. 2, 3, 5). NaN below 3 points or
    for a constant series (no correlation is defined)."""
    a, b = _clean_pairs(x, y)
    out = {"n": float(a.size), "pearson_r": math.nan, "pearson_p": math.nan, "spearman_rho": math.nan,
           "spearman_p": math.nan}
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return out
    pr, sr = sstats.pearsonr(a, b), sstats.spearmanr(a, b)
    out.update(pearson_r=float(pr[0]), pearson_p=float(pr[1]), spearman_rho=float(sr[0]), spearman_p=float(sr[1]))
    return out


def welch_ttest(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Welch's two-sample t-test (unequal variances) of two groups of runs, e.g. the seeds of vanilla and z-score
    KD; NaN unless each group has at least 2 values."""
    x = np.asarray([v for v in a if not math.isnan(v)], dtype=np.float64)
    y = np.asarray([v for v in b if not math.isnan(v)], dtype=np.float64)
    if x.size < 2 or y.size < 2:
        return {"t": math.nan, "p": math.nan}
    r = sstats.ttest_ind(x, y, equal_var=False)
    return {"t": float(r.statistic), "p": float(r.pvalue)}


def paired_ttest(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired t-test (e.g. vKD vs hKD fidelity of the same trial); NaN below 2 complete pairs."""
    x, y = _clean_pairs(a, b)
    if x.size < 2 or np.all(x - y == (x - y)[0]):
        return {"t": math.nan, "p": math.nan}
    r = sstats.ttest_rel(x, y)
    return {"t": float(r.statistic), "p": float(r.pvalue)}


def ab_pvalue(control: Sequence[float], treatment: Sequence[float]) -> float:
    """The attention study's A/B-test p-value, Eq. 9: ``#{i: fidelity(hKD_i) > fidelity(vKD_i)} / Num`` over the
    complete pairs (the same statistic as ``hpckd ab-test``); NaN without pairs."""
    x, y = _clean_pairs(control, treatment)
    return float(np.count_nonzero(y > x)) / x.size if x.size else math.nan
