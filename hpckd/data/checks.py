"""Validation of the ``data`` section, ``aug`` and ``teachers[].aug``: the choices this package owns (policy names
from :mod:`hpckd.data.aug`, formats from :mod:`hpckd.data.datasets`) and every count and size."""

from __future__ import annotations

from typing import Any

from hpckd.config.checks import at_least, choose, positive
from hpckd.data.aug import CIFAR_CROPS, FAMILIES, POLICY_NAMES, check_policies
from hpckd.data.batch import IMAGE_DTYPES
from hpckd.data.datasets import FORMATS
from hpckd.data.subsets import check_subset
from hpckd.errors import ConfigError

LOADERS = ("dali", "torch")
ON_BAD_IMAGE = ("error", "skip")


def check_data_section(cfg: Any) -> None:
    """Raise a one-line :class:`ConfigError` for the first bad value of ``cfg.data`` / ``cfg.aug`` / teacher augs."""
    data = cfg.data
    choose("data.family", data.family, FAMILIES)
    choose("data.loader", data.loader, LOADERS)
    choose("data.on_bad_image", data.on_bad_image, ON_BAD_IMAGE)
    choose("data.format", data.format, FORMATS)
    choose("data.cifar_crop", data.cifar_crop, CIFAR_CROPS)
    choose("data.dtype", data.dtype, tuple(IMAGE_DTYPES))
    policies = dict(getattr(data, "policies", None) or {})
    check_policies(policies, data.family, data.image_size, data.cifar_crop)
    names = POLICY_NAMES + tuple(str(k) for k in policies)
    used = [("aug", cfg.aug)] + [(f"teachers[{i}].aug", t.aug) for i, t in enumerate(cfg.get("teachers") or [])
                                 if t.aug is not None]
    for key, name in used:
        choose(key, name, names)
    if getattr(data, "subset", None) is not None:
        check_subset(data.subset)
    for key in ("image_size", "batch_size", "eval_batch_size"):
        at_least(f"data.{key}", data[key], 1)
    at_least("data.num_workers", data.num_workers, 1 if data.loader == "dali" else 0,
             "DALI needs at least one thread" if data.loader == "dali" else "0 = load in the main process")
    at_least("data.imbalance", data.imbalance, 1.0, "1 = the full training set, >1 = long-tailed")
    for key in ("mean", "std"):
        if len(data[key]) != 3:
            raise ConfigError(f"config: 'data.{key}' needs 3 values (R, G, B), got {list(data[key])}")
    for value in data.std:
        positive("data.std", value, "normalisation divides by it")
