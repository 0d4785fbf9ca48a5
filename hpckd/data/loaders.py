"""Build the train/val loaders of an experiment: index the folders, resolve policies per view, pick the backend."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from hpckd.data.aug import Policy, eval_policy, train_policy
from hpckd.data.batch import STUDENT, ImageFormat
from hpckd.data.datasets import load_splits
from hpckd.data.sharding import ShardSpec
from hpckd.dist import DistInfo
from hpckd.errors import ConfigError


@dataclass
class Loaders:
    train: Any
    val: Any
    train_index: Any  # FolderIndex | ArrayIndex | WdsIndex (see hpckd.data.datasets)
    val_index: Any

    @property
    def num_classes(self) -> int:
        return self.train_index.num_classes


def view_policies(family: str, size: int, student_aug: str, teacher_augs: Sequence[str | None],
                  cifar_crop: str = "pad") -> dict[str, Policy]:
    """The student's view plus one view per teacher that has its own policy (others share the student's)."""
    views = {STUDENT: train_policy(family, student_aug, size, cifar_crop)}
    for k, aug in enumerate(teacher_augs):
        if aug is not None:
            views[f"teacher{k}"] = train_policy(family, aug, size, cifar_crop)
    return views


def build_loaders(cfg, info: DistInfo, teacher_augs: Sequence[str | None] = ()) -> Loaders:
    data = cfg.data
    train_index, val_index = load_splits(data)
    for name, batch in (("data.batch_size", data.batch_size), ("data.eval_batch_size", data.eval_batch_size)):
        if batch % info.world_size:
            raise ConfigError(f"{name}={batch} is not divisible by the world size {info.world_size}; "
                              f"use a multiple of {info.world_size}")
    loader_cls = loader_class(data.loader)
    shard = ShardSpec(info.rank, info.world_size)
    common = dict(shard=shard, seed=cfg.seed, num_threads=data.num_workers, device=info.device, mean=data.mean,
                  std=data.std, image_format=image_format(cfg))
    views = view_policies(data.family, data.image_size, cfg.aug, teacher_augs, getattr(data, "cifar_crop", "pad"))
    train = loader_cls(train_index.source, train_index.labels, views, batch_size=data.batch_size // info.world_size, train=True, **common)
    # Evaluation reads float32 images: teachers and CAMs run outside the training autocast there.
    val_common = {**common, "image_format": dataclasses.replace(common["image_format"], dtype="float32")}
    val = loader_cls(val_index.source, val_index.labels, {STUDENT: eval_policy(data.family, data.image_size)},
                     batch_size=data.eval_batch_size // info.world_size, train=False, **val_common)
    return Loaders(train, val, train_index, val_index)


def image_format(cfg) -> ImageFormat:
    """The images' dtype (``data.dtype``) and layout (channels-last when ``train.channels_last``) for the model."""
    return ImageFormat(dtype=cfg.data.dtype, channels_last=bool(cfg.train.channels_last))


def loader_class(name: str):
    if name == "dali":
        from hpckd.data.dali import DaliLoader

        return DaliLoader
    from hpckd.data.torch_loader import TorchLoader

    return TorchLoader
