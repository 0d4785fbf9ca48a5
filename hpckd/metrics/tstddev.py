"""T. stddev: the standard deviation of the teacher's mean probability (augmentation study, Wang et al. 2022).

Eq. 9 and Eq. 10 of the augmentation study: the teacher's probabilities (tau = 1) over the stream of original
plus augmented samples, in loader order, are cut into consecutive groups of K samples (K = 640: ten batches of
64, i.e. five doubled batches of 32 + 32, Appendix A.3); each group gives the mean vector

    u = 1/K sum_{k in group} p_t(x_k)              (Eq. 9)

and, over the groups,

    m = Var(u) per class,   m_bar = 1/C sum_c sqrt(m_c)   (Eq. 10).

A lower T. stddev means a better augmentation for KD. The variance is unbiased (ddof = 1) by default; the public
code's ``np.var`` is the biased one (``unbiased=False``). An incomplete last group is dropped.

For comparison, Appendix A.2 (Eq. 12-13) also defines the rejected covariance and correlation metrics: for each
batch P (N x C), ``v = mean(Cov(P, P))`` and ``r = mean(Cor(P, P))`` with samples as variables and classes as
observations (``numpy.cov`` convention), averaged over batches.

Streaming/distributed: :class:`TStdDev` keeps one (C,) sum per group (exact fixed-point int64), keyed by each
sample's position in the 1-rank loader order, so N ranks reproduce the 1-rank groups exactly.
"""

from __future__ import annotations

import torch

from hpckd.metrics.ensemble import as_logprobs
from hpckd.metrics.exact import all_reduce_int64, all_reduce_max, from_fixed, rank_and_world, to_fixed


def tstddev_from_group_means(group_means: torch.Tensor, unbiased: bool = True) -> float:
    """Eq. 10: mean over classes of the per-class standard deviation of the (G, C) group mean vectors."""
    if group_means.shape[0] < 2:
        return float("nan")
    return float(group_means.double().var(dim=0, correction=1 if unbiased else 0).sqrt().mean())


def tstddev(teacher_probs: torch.Tensor, group_size: int = 640, unbiased: bool = True) -> float:
    """T. stddev (augmentation study Eq. 9-10) of (N, C) teacher probabilities given in loader order.

    Consecutive groups of ``group_size`` rows give the mean vectors u; a trailing partial group is dropped.
    Needs at least two complete groups (NaN otherwise).
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    n_groups = teacher_probs.shape[0] // group_size
    probs = teacher_probs[: n_groups * group_size].double()
    means = probs.reshape(n_groups, group_size, -1).mean(dim=1)
    return tstddev_from_group_means(means, unbiased)


def _batches(teacher_probs: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for a covariance between samples, got {batch_size}")
    return [b for b in teacher_probs.double().split(batch_size) if b.shape[0] >= 2]


def teacher_covariance(teacher_probs: torch.Tensor, batch_size: int) -> float:
    """v_bar (augmentation study Eq. 12-13): batch mean of ``mean(Cov(P, P))``, samples as variables."""
    values = [torch.cov(b).mean() for b in _batches(teacher_probs, batch_size)]
    return float(torch.stack(values).mean()) if values else float("nan")


def teacher_correlation(teacher_probs: torch.Tensor, batch_size: int) -> float:
    """r_bar (augmentation study Eq. 12-13): batch mean of ``mean(Cor(P, P))``, samples as variables."""
    values = [torch.corrcoef(b).mean() for b in _batches(teacher_probs, batch_size)]
    return float(torch.stack(values).mean()) if values else float("nan")


class TStdDev:
    """Streaming, distributed T. stddev (augmentation study Eq. 9-10).

    Each sample is assigned to group ``(position * rows_per_position) // group_size``, where ``position`` is its
    place in the 1-rank loader order. Without explicit positions, the i-th valid row seen on rank r of W gets
    ``i * W + r`` -- the order of ``torch.utils.data.DistributedSampler`` (rank r takes every W-th sample), so
    2 ranks give the same groups as 1 rank. Pass positions yourself for other shardings (e.g. contiguous DALI
    shards). ``rows_per_position = 2`` suits the doubled batch, where an original and its augmented copy share a
    position. Only complete groups (exactly ``group_size`` valid rows) count; memory grows with the number of
    groups (one (C,) int64 sum each), which the metric inherently needs.
    """

    def __init__(
        self, num_classes: int, group_size: int = 640, unbiased: bool = True, rows_per_position: int = 1
    ) -> None:
        if group_size < 1 or rows_per_position < 1:
            raise ValueError("group_size and rows_per_position must be >= 1")
        self.num_classes = num_classes
        self.group_size = group_size
        self.unbiased = unbiased
        self.rows_per_position = rows_per_position
        self.reset()

    def reset(self) -> None:
        self._seen = 0
        self._sums = torch.zeros(0, self.num_classes, dtype=torch.int64)
        self._counts = torch.zeros(0, dtype=torch.int64)

    def _grow(self, n_groups: int, device: torch.device) -> None:
        if self._sums.device != device:
            self._sums, self._counts = self._sums.to(device), self._counts.to(device)
        have = self._counts.shape[0]
        if n_groups <= have:
            return
        new = max(n_groups, 2 * have)  # amortised doubling
        sums = torch.zeros(new, self.num_classes, dtype=torch.int64, device=device)
        counts = torch.zeros(new, dtype=torch.int64, device=device)
        sums[:have], counts[:have] = self._sums, self._counts
        self._sums, self._counts = sums, counts

    def default_positions(self, n: int, device: torch.device) -> torch.Tensor:
        """Positions of the next ``n`` rows in DistributedSampler order (``i * W + r``); advances the counter."""
        rank, world = rank_and_world()
        local = torch.arange(self._seen, self._seen + n, device=device, dtype=torch.int64)
        self._seen += n
        return local * world + rank

    def update(
        self, teacher_logits: torch.Tensor, positions: torch.Tensor | None = None, valid: torch.Tensor | None = None
    ) -> None:
        """Add (N, C) teacher logits or log-probabilities (softmax at tau = 1 is applied)."""
        device = teacher_logits.device
        if valid is not None:
            keep = valid.to(device).bool()
            teacher_logits = teacher_logits[keep]
            positions = None if positions is None else positions.to(device)[keep]
        if positions is None:
            # Only valid rows advance the counter, so padding (wherever the loader puts it) shifts nothing.
            positions = self.default_positions(teacher_logits.shape[0], device)
        probs = as_logprobs(teacher_logits).exp()
        groups = (positions.to(device).long() * self.rows_per_position) // self.group_size
        if groups.numel() == 0:
            return
        self._grow(int(groups.max()) + 1, device)
        self._sums.index_add_(0, groups, to_fixed(probs))
        self._counts.index_add_(0, groups, torch.ones_like(groups))

    def compute(self, group: object | None = None) -> dict[str, float]:
        """``{"tstddev": m_bar, "tstddev_groups": number of complete groups}``, reduced over all ranks."""
        n_groups = all_reduce_max(self._counts.shape[0], group, self._counts.device)
        self._grow(n_groups, self._counts.device)
        reduced = all_reduce_int64({"sums": self._sums[:n_groups], "counts": self._counts[:n_groups]}, group)
        complete = reduced["counts"] == self.group_size
        means = from_fixed(reduced["sums"][complete]) / self.group_size
        return {"tstddev": tstddev_from_group_means(means, self.unbiased), "tstddev_groups": float(int(complete.sum()))}
