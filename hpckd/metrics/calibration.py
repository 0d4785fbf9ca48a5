"""Calibration: expected calibration error (ECE) and reliability-diagram bins.

Attention study (Guo et al.), Eq. 13, after Guo et al. (2017):

    ECE = sum_{m=1}^{M} |B_m| / N * |Acc(B_m) - Conf(B_m)|

where B_m holds the samples whose confidence (top-1 probability) lies in ((m-1)/M, m/M]. Other weightings:

- ``"uniform"``: the mean of |Acc - Conf| over the *non-empty* bins, without the |B_m|/N weights;
- ``"all_bins"``: the attention study's public code (``calculate_ece.py``), ``np.abs(acc - conf).mean()`` over
  *all* M bins, an empty bin counting 0, i.e. ``1/M sum_{m: B_m non-empty} |Acc(B_m) - Conf(B_m)|`` (its code
  uses M = 10 bins: set ``metrics.n_bins=10``).

The bins are sufficient statistics (count, correct count, confidence sum), so the same code
serves one batch, a streamed split, and an all-reduce over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from hpckd.metrics.ensemble import as_logprobs

Weighting = Literal["count", "uniform", "all_bins"]
WEIGHTINGS: tuple[str, ...] = ("count", "uniform", "all_bins")


def bin_edges(n_bins: int) -> torch.Tensor:
    """(M + 1,) float64 edges ``m / M``; bin m covers ``(edges[m], edges[m + 1]]``."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return torch.arange(n_bins + 1, dtype=torch.float64) / n_bins


def confidence_bins(confidence: torch.Tensor, n_bins: int) -> torch.Tensor:
    """(N,) int64 bin index of each confidence, with right-closed bins ``((m-1)/M, m/M]`` (0 falls in bin 0)."""
    inner = bin_edges(n_bins)[1:-1].to(confidence.device)
    return torch.bucketize(confidence.double(), inner, right=False)


def confidence_and_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 probability (float64) and whether the top-1 class is the label, per sample."""
    logp = as_logprobs(logits)
    top_logp, pred = logp.max(dim=-1)
    return top_logp.exp(), pred == labels


@dataclass
class ReliabilityDiagram:
    """Per-bin data of a reliability diagram (Guo et al. 2017); empty bins have NaN accuracy/confidence."""

    edges: list[float]
    counts: list[int]
    accuracy: list[float]
    confidence: list[float]

    def ece(self, weighting: Weighting = "count") -> float:
        return ece_from_bins(
            torch.tensor(self.counts, dtype=torch.float64),
            torch.tensor(self.accuracy, dtype=torch.float64),
            torch.tensor(self.confidence, dtype=torch.float64),
            weighting,
        )

    def as_dict(self) -> dict[str, list]:
        return {"edges": self.edges, "counts": self.counts, "accuracy": self.accuracy, "confidence": self.confidence}


def diagram_from_sums(counts: torch.Tensor, correct: torch.Tensor, confidence_sum: torch.Tensor) -> ReliabilityDiagram:
    """Reliability diagram from per-bin sample counts, correct counts and confidence sums (all (M,))."""
    c = counts.double().cpu()
    safe = c.clamp(min=1)
    acc = torch.where(c > 0, correct.double().cpu() / safe, torch.full_like(c, float("nan")))
    conf = torch.where(c > 0, confidence_sum.double().cpu() / safe, torch.full_like(c, float("nan")))
    return ReliabilityDiagram(
        edges=bin_edges(c.shape[0]).tolist(),
        counts=[int(v) for v in counts.cpu()],
        accuracy=acc.tolist(),
        confidence=conf.tolist(),
    )


def ece_from_bins(
    counts: torch.Tensor, accuracy: torch.Tensor, confidence: torch.Tensor, weighting: Weighting = "count"
) -> float:
    """ECE from per-bin counts, accuracies and mean confidences (attention study Eq. 13).

    ``"count"`` weights each bin by |B_m| / N (Eq. 13); ``"uniform"`` averages the non-empty bins equally;
    ``"all_bins"`` averages over all M bins with an empty bin counting 0 (the attention study's public code).
    """
    nonempty = counts > 0
    if not bool(nonempty.any()):
        return float("nan")
    gaps = (accuracy[nonempty] - confidence[nonempty]).abs()
    if weighting == "count":
        w = counts[nonempty].double()
        return float((w * gaps).sum() / w.sum())
    if weighting == "uniform":
        return float(gaps.mean())
    if weighting == "all_bins":
        return float(gaps.sum() / counts.numel())
    raise ValueError(f"unknown ECE weighting {weighting!r}; choose one of {WEIGHTINGS}")


def reliability_diagram(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> ReliabilityDiagram:
    """Per-bin counts, accuracy and mean confidence of a model's top-1 predictions (logits or log-probs)."""
    conf, correct = confidence_and_correct(logits, labels)
    idx = confidence_bins(conf, n_bins)
    counts = torch.bincount(idx, minlength=n_bins)
    hits = torch.bincount(idx, weights=correct.double(), minlength=n_bins)
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    return diagram_from_sums(counts, hits, conf_sum)


def ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, weighting: Weighting = "count") -> float:
    """Expected calibration error in [0, 1] (attention study Eq. 13), ``n_bins`` equal-width confidence bins."""
    return reliability_diagram(logits, labels, n_bins).ece(weighting)
