"""Mutual information between the teacher's and the student's top-1 labels.

Attention study (Guo et al.), Eq. 4:

    MI(Y^t; Y^s) = sum_{y^t, y^s} P(y^t, y^s) log( P(y^t, y^s) / (P(y^t) P(y^s)) )

in nats, with P the empirical joint distribution of the two argmax labels. The issue's default estimates it once
from the joint histogram of the whole split (a sufficient statistic that all-reduces exactly); the study's public
code averages per-batch estimates, available with ``batch_size=...``. The plug-in estimate is biased low on
small samples; the Miller-Madow correction adds ``(m - 1) / (2N)`` to each entropy, m = number of non-empty cells:

    MI_MM = MI + ((m_t - 1) + (m_s - 1) - (m_ts - 1)) / (2N)

The study's public code (``trainer.py``, ``get_mi``) reports a second estimate per batch:
``sklearn.feature_selection.mutual_info_classif(student_top1[:, None], teacher_top1)[0]``, i.e. the student's
top-1 label treated as a *continuous* feature and the teacher's as the class, estimated with k = 3 nearest
neighbours (Ross 2014); :func:`knn_mutual_information` is that call (with a fixed ``random_state`` for the small
noise sklearn adds, which the code leaves unseeded).
"""

from __future__ import annotations

import torch


def _labels(x: torch.Tensor) -> torch.Tensor:
    """Argmax labels from (N, C) logits/probabilities, or the (N,) labels themselves."""
    if x.dim() == 2:
        return x.argmax(dim=-1)
    if x.dim() == 1:
        return x.long()
    raise ValueError(f"expected (N,) labels or (N, C) logits, got shape {tuple(x.shape)}")


def joint_histogram(teacher_pred: torch.Tensor, student_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts: ``[i, j]`` = number of samples the teacher labels i and the student labels j."""
    t, s = _labels(teacher_pred), _labels(student_pred)
    if t.shape != s.shape:
        raise ValueError(f"teacher and student predictions differ in length: {t.shape[0]} vs {s.shape[0]}")
    flat = t * num_classes + s
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).long()


def _plugin_entropy(counts: torch.Tensor, n: float) -> torch.Tensor:
    p = counts[counts > 0].double() / n
    return -(p * p.log()).sum()


def mutual_information_from_joint(joint: torch.Tensor, miller_madow: bool = False) -> float:
    """MI in nats (attention study Eq. 4) of a (C, C) joint count histogram, optionally Miller-Madow corrected.

    Computed as ``H(T) + H(S) - H(T, S)``, which equals Eq. 4 for the empirical distribution.
    """
    n = float(joint.sum())
    if n == 0:
        return float("nan")
    h_t = _plugin_entropy(joint.sum(dim=1), n)
    h_s = _plugin_entropy(joint.sum(dim=0), n)
    h_ts = _plugin_entropy(joint.reshape(-1), n)
    mi = h_t + h_s - h_ts
    if miller_madow:
        m_t = int((joint.sum(dim=1) > 0).sum())
        m_s = int((joint.sum(dim=0) > 0).sum())
        m_ts = int((joint > 0).sum())
        mi = mi + ((m_t - 1) + (m_s - 1) - (m_ts - 1)) / (2.0 * n)
    return float(mi)


def mutual_information(
    teacher_pred: torch.Tensor,
    student_pred: torch.Tensor,
    num_classes: int,
    miller_madow: bool = False,
    batch_size: int | None = None,
) -> float:
    """MI in nats between teacher and student top-1 labels (attention study Eq. 4).

    Args:
        teacher_pred, student_pred: (N,) labels or (N, C) logits/probabilities (argmax is taken).
        num_classes: C.
        miller_madow: add the Miller-Madow bias correction.
        batch_size: ``None`` estimates from the whole split (default); an int averages the estimates of
            consecutive batches of that size, as the attention study's public code does (the last batch may be
            smaller; every batch counts equally).
    """
    t, s = _labels(teacher_pred), _labels(student_pred)
    if batch_size is None:
        return mutual_information_from_joint(joint_histogram(t, s, num_classes), miller_madow)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    values = [
        mutual_information_from_joint(
            joint_histogram(t[i : i + batch_size], s[i : i + batch_size], num_classes), miller_madow
        )
        for i in range(0, t.shape[0], batch_size)
    ]
    return float(sum(values) / len(values)) if values else float("nan")


KNN_NEIGHBOURS = 3  # sklearn's default n_neighbors, which the study's code keeps


def knn_mutual_information(teacher_pred: torch.Tensor, student_pred: torch.Tensor, random_state: int = 0) -> float:
    """The attention study's code's second MI estimate (nats) of one batch: sklearn's nearest-neighbour
    ``mutual_info_classif`` with the student's top-1 label as a continuous feature and the teacher's as the target
    (``get_mi`` in its ``trainer.py``; not Eq. 4's plug-in estimator). ``random_state`` fixes sklearn's jitter."""
    from sklearn.feature_selection import mutual_info_classif

    t, s = _labels(teacher_pred), _labels(student_pred)
    if t.shape != s.shape:
        raise ValueError(f"teacher and student predictions differ in length: {t.shape[0]} vs {s.shape[0]}")
    if t.numel() <= KNN_NEIGHBOURS:
        return float("nan")
    features = s.detach().cpu().double().numpy().reshape(-1, 1)
    target = t.detach().cpu().numpy()
    return float(mutual_info_classif(features, target, n_neighbors=KNN_NEIGHBOURS, random_state=random_state)[0])
