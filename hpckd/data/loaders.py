"""Build the train/val loaders of an experiment: index the folders, resolve policies per view, pick the backend."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hpckd.data.aug import Policy, eval_policy, train_policy
from hpckd.data.batch import STUDENT
from hpckd.data.dali import ShardSpec
from hpckd.data.index import FolderIndex, build_index
from hpckd.dist import DistInfo
from hpckd.errors import ConfigError


@dataclass
class Loaders:
    train: Any
    val: Any
    train_index: FolderIndex
    val_index: FolderIndex

    @property
    def num_classes(self) -> int:
        return self.train_index.num_classes


def view_policies(family: str, size: int, student_aug: str, teacher_augs: Sequence[str | None]) -> dict[str, Policy]:
    """The student's view plus one view per teacher that has its own policy (others share the student's)."""
    views = {STUDENT: train_policy(family, student_aug, size)}
    for k, aug in enumerate(teacher_augs):
        if aug is not None:
            views[f"teacher{k}"] = train_policy(family, aug, size)
    return views


def build_loaders(cfg, info: DistInfo, teacher_augs: Sequence[str | None] = ()) -> Loaders:
    data = cfg.data
    root = Path(data.root)
    train_index = build_index(root / "train", data.on_bad_image)
    val_index = build_index(root / "val", data.on_bad_image, classes=train_index.classes)
    for name, batch in (("data.batch_size", data.batch_size), ("data.eval_batch_size", data.eval_batch_size)):
        if batch % info.world_size:
            raise ConfigError(f"{name}={batch} is not divisible by the world size {info.world_size}; "
                              f"use a multiple of {info.world_size}")
    loader_cls = _loader_class(data.loader)
    shard = ShardSpec(info.rank, info.world_size)
    common = dict(shard=shard, seed=cfg.seed, num_threads=data.num_workers, device=info.device, mean=data.mean, std=data.std)
    views = view_policies(data.family, data.image_size, cfg.aug, teacher_augs)
    train = loader_cls(train_index.files, train_index.labels, views, batch_size=data.batch_size // info.world_size, train=True, **common)
    val = loader_cls(val_index.files, val_index.labels, {STUDENT: eval_policy(data.family, data.image_size)},
                     batch_size=data.eval_batch_size // info.world_size, train=False, **common)
    return Loaders(train, val, train_index, val_index)


def _loader_class(name: str):
    if name == "dali":
        from hpckd.data.dali import DaliLoader

        return DaliLoader
    from hpckd.data.torch_loader import TorchLoader

    return TorchLoader
