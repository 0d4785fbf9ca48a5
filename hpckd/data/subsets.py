"""Subsets of a data set from the config (``data.subset``): class subsets, the D0/D1 halves, few-shot.

Every index format (folder / list files / Tiny ImageNet, CIFAR pickles, WebDataset shards) offers ``select``
(positions, renumbered 0..len-1) and ``relabel`` (a new class list); this module only computes positions, so the
three formats get the same subsets. The subset is part of the data fingerprint (:func:`tag`), so results and logit
stores of different subsets never match.

- Class subsets (ImageNet-100 style): ``classes: [names]`` keeps those classes in that order, or ``num_classes: k``
  the first k of the sorted class list; labels become 0..k-1 in train and val alike.
- D0 / D1 (the fidelity study, Sec. 5.2, "we randomly split the CIFAR-100 training dataset D into two equal parts,
  D0 and D1"): a seeded permutation of the training samples; D0 is its first ``round(split_fraction * N)``
  samples and D1 the rest, so the two are disjoint and together the whole set. The teachers train on ``d0``; the
  students distil on ``d0``, ``d1`` or ``all`` (D0 u D1).
- Few-shot (the attention study, App. A.8): ``per_class: N`` keeps at most N training images per class, chosen by
  a seeded permutation per class (their N = 10,000 CIFAR-100 images is ``per_class: 100``, N = 50,000 ImageNet
  images ``per_class: 50``).

Validation always keeps every image of the kept classes.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from hpckd.config.checks import at_least, choose, within
from hpckd.errors import ConfigError, DataError

SPLITS = ("all", "d0", "d1")


def check_subset(subset: Any) -> None:
    """One-line :class:`ConfigError` for the first bad value of ``data.subset``."""
    choose("data.subset.split", subset.split, SPLITS)
    within("data.subset.split_fraction", subset.split_fraction, 0.0, 1.0)
    at_least("data.subset.num_classes", subset.num_classes, 0, "0 = every class")
    at_least("data.subset.per_class", subset.per_class, 0, "0 = every image")
    if subset.classes and subset.num_classes:
        raise ConfigError("config: 'data.subset.classes' and 'data.subset.num_classes' both set; choose one")
    if len(set(subset.classes)) != len(subset.classes):
        raise ConfigError(f"config: 'data.subset.classes' names a class twice: {list(subset.classes)}")


def is_full(subset: Any) -> bool:
    return not subset.classes and not subset.num_classes and subset.split == "all" and not subset.per_class


def kept_classes(classes: list[str], subset: Any) -> list[int]:
    """Indices (into ``classes``) of the classes a subset keeps, in the subset's order."""
    if subset.num_classes:
        if subset.num_classes > len(classes):
            raise DataError(f"data.subset.num_classes={subset.num_classes} but the data set has {len(classes)} classes")
        return list(range(subset.num_classes))
    lookup = {name: i for i, name in enumerate(classes)}
    keep = []
    for name in subset.classes:
        name = str(name)
        if name not in lookup:
            raise DataError(f"data.subset.classes names {name!r}, which is not a class of the data set "
                            f"(classes: {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
        keep.append(lookup[name])
    return keep


def class_subset(index: Any, keep: list[int]) -> Any:
    """``index`` restricted to the classes ``keep`` (old ids), relabelled 0..len(keep)-1 in that order."""
    labels = np.asarray(index.labels, dtype=np.int64)
    new_id = np.full(len(index.classes), -1, dtype=np.int64)
    new_id[keep] = np.arange(len(keep))
    positions = np.flatnonzero(new_id[labels] >= 0)
    if len(positions) == 0:
        raise DataError("data.subset keeps no image (the chosen classes are empty)")
    selected = index.select(positions)
    return selected.relabel([index.classes[i] for i in keep], [int(v) for v in new_id[labels[positions]]])


def split_positions(n: int, fraction: float, seed: int, which: str) -> np.ndarray:
    """Sorted positions of D0 (``which="d0"``) or D1 of ``n`` samples: a seeded permutation, D0 its first
    ``round(fraction * n)``."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(fraction * n))
    part = order[:cut] if which == "d0" else order[cut:]
    if len(part) == 0:
        raise DataError(f"data.subset.split={which} with split_fraction={fraction} leaves no training image")
    return np.sort(part)


def few_shot_positions(labels: Any, num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """Sorted positions of at most ``per_class`` samples of each class, a seeded permutation per class."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(num_classes)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def tag(subset: Any, split: str = "train") -> str:
    """A canonical description of a subset: mixed into the fingerprint of every index it produced (``split="val"``:
    only the class subset, the one part that changes the validation split)."""
    if is_full(subset):
        return ""
    parts = []
    if subset.classes:
        parts.append("classes=" + ",".join(str(c) for c in subset.classes))
    if subset.num_classes:
        parts.append(f"num_classes={subset.num_classes}")
    if split == "val":
        return ";".join(parts)
    if subset.split != "all":
        parts.append(f"split={subset.split}:{subset.split_fraction!r}:{subset.split_seed}")
    if subset.per_class:
        parts.append(f"per_class={subset.per_class}:{subset.per_class_seed}")
    return ";".join(parts)


def mix(fingerprint: str, subset_tag: str) -> str:
    """The fingerprint of a subset: the full data's fingerprint with the subset's tag (unchanged without one)."""
    if not subset_tag:
        return fingerprint
    return hashlib.sha256(f"{fingerprint}\0{subset_tag}".encode()).hexdigest()[:16]


def apply_classes(train: Any, val: Any, subset: Any) -> tuple[Any, Any]:
    """The class subset of both splits (first step; before a long-tailed profile is cut)."""
    if not subset.classes and not subset.num_classes:
        return train, val
    keep = kept_classes(list(train.classes), subset)
    return class_subset(train, keep), class_subset(val, keep)


def apply_train_subset(train: Any, subset: Any) -> Any:
    """The D0/D1 half and the few-shot subset of the training split, then the subset's fingerprint tag."""
    if subset.split != "all":
        train = train.select(split_positions(len(train), subset.split_fraction, subset.split_seed, subset.split))
    if subset.per_class:
        train = train.select(few_shot_positions(train.labels, train.num_classes, subset.per_class,
                                                subset.per_class_seed))
    return train
