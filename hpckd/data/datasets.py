"""Resolve a data config into the train and val indexes: ImageFolder (or list files), CIFAR pickles, WebDataset.

Every index offers the same attributes: ``source`` (what loaders read), ``labels``, ``classes``,
``num_classes``, ``skipped`` (bad inputs dropped, reported) and ``fingerprint()`` (recorded in results and logit
stores), and ``len()``.

==========  ==========================================================================================
format      layout under ``data.root``
==========  ==========================================================================================
folder      ``train/<class>/<img>`` and ``val/<class>/<img>``; or list files (``data.train_list``,
            ``data.val_list``: ``relative/path label`` lines, ImageNet-LT's format; a val label file for a
            flat ``val/`` folder uses the same format, with class indices or training class names)
cifar10     the official python batches (``cifar-10-batches-py/``), see :mod:`hpckd.data.cifar`
cifar100    ``cifar-100-python/``
wds         ``train/`` and ``val/`` written by ``hpckd data shard`` (:mod:`hpckd.data.wds`)
tinyimagenet  Tiny ImageNet as unpacked: ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` labelled by
            ``val/val_annotations.txt`` (:func:`hpckd.data.index.build_tiny_imagenet`)
==========  ==========================================================================================

``data.subset`` keeps a class subset, the fidelity study's D0/D1 half or a few-shot subset, for every format
alike (:mod:`hpckd.data.subsets`); the subset is part of the fingerprint.

``data.imbalance`` > 1 keeps the long-tailed subset of the training split (exponential profile,
:mod:`hpckd.data.longtail`; CIFAR-100-LT: ``imbalance: 100``); validation stays balanced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpckd.data.cifar import load_cifar
from hpckd.data.index import build_index, build_list_index, build_tiny_imagenet, read_list_file
from hpckd.data.longtail import long_tail_positions
from hpckd.data.subsets import apply_classes, apply_train_subset, is_full, tag
from hpckd.data.wds import load_wds
from hpckd.errors import DataError

FORMATS = ("folder", "cifar10", "cifar100", "wds", "tinyimagenet")


def _get(data: Any, name: str, default: Any) -> Any:
    """A data-config field, with a default for configs that predate it."""
    return getattr(data, name, default) if not isinstance(data, dict) else data.get(name, default)


def load_splits(data: Any) -> tuple[Any, Any]:
    """(train index, val index) of a data config (``cfg.data``)."""
    fmt = _get(data, "format", "folder")
    root = Path(data.root)
    bad = data.on_bad_image
    if fmt == "folder":
        cache = _get(data, "index_cache", "auto")
        train_list, val_list = _get(data, "train_list", None), _get(data, "val_list", None)
        train = (build_list_index(_list_base(root, "train", train_list), train_list, bad) if train_list
                 else build_index(root / "train", bad, cache=cache))
        val = (build_list_index(_list_base(root, "val", val_list), val_list, bad, classes=train.classes) if val_list
               else build_index(root / "val", bad, classes=train.classes, cache=cache))
    elif fmt in ("cifar10", "cifar100"):
        train, val = load_cifar(root, fmt, "train"), load_cifar(root, fmt, "val")
    elif fmt == "tinyimagenet":
        train = build_tiny_imagenet(root, "train", bad)
        val = build_tiny_imagenet(root, "val", bad, classes=train.classes)
    elif fmt == "wds":
        train, val = load_wds(root / "train"), load_wds(root / "val")
        if val.classes != train.classes:
            raise DataError(f"{root}: the val shards' classes differ from the train shards'")
    else:
        raise DataError(f"unknown data.format {fmt!r}; choose one of {', '.join(FORMATS)}")
    subset = _get(data, "subset", None)
    if subset is not None:
        train, val = apply_classes(train, val, subset)
    imbalance = float(_get(data, "imbalance", 1.0))
    if imbalance > 1.0:
        train = train.select(long_tail_positions(train.labels, train.num_classes, imbalance, _get(data, "lt_seed", 0)))
    if subset is not None and not is_full(subset):
        train = apply_train_subset(train, subset).tagged(tag(subset))
        val = val.tagged(tag(subset, "val"))
    return train, val


def _list_base(root: Path, split: str, list_file: str) -> Path:
    """List paths are relative to ``root`` (ImageNet-LT: ``train/n01440764/...``) or to ``root/split`` (a flat
    val folder's label file: ``ILSVRC2012_val_00000001.JPEG n01751748``); the first entry decides."""
    first = read_list_file(list_file)[0][0]
    if not (root / first).exists() and (root / split / first).exists():
        return root / split
    return root


def check_dataset(data: Any) -> None:
    """Fail early, with one line, when the data a config names cannot be read (used before relaunching)."""
    load_splits(data)
