"""Statistics across trials: the attention study's A/B-test p-value, the response-based study's normalised
accuracy, and Pearson/Spearman correlations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


def ab_test_pvalue(fidelity_control: Sequence[float], fidelity_treatment: Sequence[float]) -> float:
    """A/B-test p-value of the attention study (Guo et al.), Eq. 9.

        p-value = #{trials: fidelity(hKD) > fidelity(vKD)} / Num

    The trials are paired (same augmentation trial under the control vKD and the treatment hKD, e.g. the
    half-image inputs). H0: lowering the teachers' attention IoU (hKD) *raises* student-teacher fidelity; a
    p-value below 0.05 rejects it.
    """
    control = np.asarray(fidelity_control, dtype=np.float64)
    treatment = np.asarray(fidelity_treatment, dtype=np.float64)
    if control.shape != treatment.shape or control.ndim != 1 or control.size == 0:
        shapes = f"{control.shape} and {treatment.shape}"
        raise ValueError(f"need two equally long, non-empty 1-D sequences of paired trials, got {shapes}")
    return float(np.count_nonzero(treatment > control)) / control.size


def normalized_accuracy(acc: float, acc_weak: float, acc_strong: float) -> float:
    """The response-based study's normalised accuracy (Figs. 5-6): ``(acc - acc^-) / (acc^+ - acc^-)``, with
    ``acc^-`` the student distilled from the weak teacher only and ``acc^+`` from the strong teacher only (0: as the
    weak teacher, 1: as the strong one)."""
    if acc_strong == acc_weak:
        raise ValueError(f"acc+ and acc- are both {acc_weak}: the normalised accuracy is undefined")
    return (float(acc) - float(acc_weak)) / (float(acc_strong) - float(acc_weak))


@dataclass(frozen=True)
class CorrelationResult:
    """Pearson's r and Spearman's rho with their two-sided p-values (scipy.stats), over n points."""

    pearson_r: float
    pearson_p: float
    spearman_rho: float
    spearman_p: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def correlation(x: Sequence[float], y: Sequence[float]) -> CorrelationResult:
    """Pearson and Spearman correlation of two paired series, e.g. T. stddev vs. student test loss (augmentation
    study Fig. 4) or IoU vs. validation accuracy (attention study Fig. 2). Needs at least 3 points."""
    from scipy import stats as sstats

    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 3:
        raise ValueError(f"need two equally long 1-D series with at least 3 points, got {a.shape} and {b.shape}")
    pr = sstats.pearsonr(a, b)
    sr = sstats.spearmanr(a, b)
    return CorrelationResult(float(pr[0]), float(pr[1]), float(sr[0]), float(sr[1]), int(a.size))
