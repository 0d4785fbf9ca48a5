"""Long-tailed subsets: CIFAR-LT by an imbalance factor, ImageNet-LT from its list files.

CIFAR-10/100-LT (Cui et al., CVPR 2019; Cao et al., NeurIPS 2019 "LDAM"), as used by the attention study
(CIFAR-100 imb100): class c of C keeps

    n_c = floor(n_max * (1 / imb) ** (c / (C - 1)))

training images (n_max = the per-class count of the balanced set, 500 for CIFAR-100), so class 0 keeps all and
class C-1 keeps n_max / imb. Which images a class keeps: a seeded permutation of its images (the LDAM code
shuffles with seed 0 and takes the first n_c), so the subset is fixed by ``seed``. Validation stays balanced.

ImageNet-LT (Liu et al., CVPR 2019) is distributed as list files (``ImageNet_LT_train.txt`` etc.) of
``relative/path label`` lines: :func:`hpckd.data.index.build_list_index` reads them.
"""

from __future__ import annotations

import math

import numpy as np

from hpckd.errors import DataError


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Per-class counts of the exponential profile n_c = floor(n_max * imb^(-c / (C - 1)))."""
    if imbalance < 1:
        raise DataError(f"imbalance factor {imbalance} must be >= 1 (n_max / n_min)")
    if num_classes == 1:
        return [n_max]
    # Same float expression as the LDAM code (img_max * (1/imb) ** (c / (C - 1.0)), then int), so counts agree.
    return [int(math.floor(n_max * (1.0 / imbalance) ** (c / (num_classes - 1.0)))) for c in range(num_classes)]


def long_tail_positions(labels, num_classes: int, imbalance: float, seed: int = 0) -> np.ndarray:
    """Sorted positions of the long-tailed subset of ``labels`` (a balanced set, n_max = the smallest class)."""
    labels = np.asarray(labels, dtype=np.int64)
    per_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    n_max = min(len(p) for p in per_class)
    if n_max == 0:
        raise DataError("long-tailed subset: every class needs images in the balanced set")
    counts = long_tail_counts(n_max, num_classes, imbalance)
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(p)[:n] for p, n in zip(per_class, counts)]
    return np.sort(np.concatenate(keep))
