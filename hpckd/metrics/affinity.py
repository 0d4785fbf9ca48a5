"""Affinity: how far augmentation moves the data, as seen by the trained student.

Attention study (Guo et al.), Eq. 5, adapted from Cubuk et al. (2021):

    Affinity = Acc(D'_val) / Acc(D_val)

where D'_val is the validation set with the student's training augmentation applied and D_val the clean one.
Lower Affinity = stronger augmentation. D'_val must be the same for every trial of a dataset, so the augmented
validation set is drawn with a seed fixed per dataset (:func:`affinity_seed`).
"""

from __future__ import annotations

import zlib


def affinity(acc_augmented_val: float, acc_clean_val: float) -> float:
    """Eq. 5: accuracy on the augmented validation set divided by accuracy on the clean one."""
    for name, value in (("acc_augmented_val", acc_augmented_val), ("acc_clean_val", acc_clean_val)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must be an accuracy in [0, 1], got {value}")
    if float(acc_clean_val) == 0.0:
        return float("nan")  # undefined: the model is never right on clean data
    return float(acc_augmented_val) / float(acc_clean_val)


def affinity_seed(dataset: str) -> int:
    """The fixed seed of a dataset's augmented validation set, identical across trials, runs and machines.

    A stable hash (CRC-32) of the dataset name, so every trial of a sweep evaluates on the same D'_val without
    coordinating seeds.
    """
    return zlib.crc32(f"hpckd-affinity:{dataset}".encode()) & 0x7FFFFFFF
