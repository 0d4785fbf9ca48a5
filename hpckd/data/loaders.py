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


def student_policy(cfg: Any) -> Policy:
    """The training policy of the model being trained (``aug``, with the data section's crop choice)."""
    data = cfg.data
    return train_policy(data.family, cfg.aug, data.image_size, data.cifar_crop, user_policies(cfg))


def user_policies(cfg: Any) -> dict[str, Any]:
    """The policies written in the config (``data.policies``; configs that predate it have none)."""
    policies = getattr(cfg.data, "policies", None)
    return dict(policies) if policies else {}


def view_policies(cfg: Any, teacher_augs: Sequence[str | None] = ()) -> dict[str, Policy]:
    """The student's view plus one view per teacher that has its own policy (others share the student's)."""
    data = cfg.data
    views = {STUDENT: student_policy(cfg)}
    for k, aug in enumerate(teacher_augs):
        if aug is not None:
            views[f"teacher{k}"] = train_policy(data.family, aug, data.image_size, data.cifar_crop, user_policies(cfg))
    return views


def build_loaders(cfg: Any, info: DistInfo, teacher_augs: Sequence[str | None] = ()) -> Loaders:
    """The training loader (every view of ``view_policies``) and the evaluation loader of the val split."""
    data = cfg.data
    train_index, val_index = load_splits(data)
    for name, batch in (("data.batch_size", data.batch_size), ("data.eval_batch_size", data.eval_batch_size)):
        if batch % info.world_size:
            raise ConfigError(f"{name}={batch} is not divisible by the world size {info.world_size}; "
                              f"use a multiple of {info.world_size}")
    train = loader_class(data.loader)(train_index.source, train_index.labels, view_policies(cfg, teacher_augs),
                                      batch_size=data.batch_size // info.world_size, train=True,
                                      **_common(cfg, info, cfg.seed, image_format(cfg)))
    return Loaders(train, build_eval_loader(cfg, info, val_index), train_index, val_index)


def build_eval_loader(cfg: Any, info: DistInfo, index: Any, policy: Policy | None = None,
                      seed: int | None = None) -> Any:
    """The evaluation loader of one split, for the per-epoch evaluation and ``hpckd eval`` alike: each rank reads
    its contiguous range once, unpadded. ``policy`` defaults to the evaluation policy (resize + center crop);
    ``hpckd eval --augmented`` passes :func:`student_policy` and the Affinity seed.

    Evaluation reads float32 images: teachers and CAMs run in the teachers' own precision there."""
    data = cfg.data
    fmt = dataclasses.replace(image_format(cfg), dtype="float32")
    return loader_class(data.loader)(index.source, index.labels,
                                     {STUDENT: policy or eval_policy(data.family, data.image_size)},
                                     batch_size=max(1, data.eval_batch_size // info.world_size), train=False,
                                     **_common(cfg, info, cfg.seed if seed is None else seed, fmt))


def _common(cfg: Any, info: DistInfo, seed: int, fmt: ImageFormat) -> dict[str, Any]:
    data = cfg.data
    return dict(shard=ShardSpec(info.rank, info.world_size), seed=seed, num_threads=data.num_workers,
                device=info.device, mean=data.mean, std=data.std, image_format=fmt)


def image_format(cfg: Any) -> ImageFormat:
    """The images' dtype (``data.dtype``) and layout (channels-last when ``train.channels_last``) for the model."""
    return ImageFormat(dtype=cfg.data.dtype, channels_last=bool(cfg.train.channels_last))


def loader_class(name: str):
    if name == "dali":
        from hpckd.data.dali import DaliLoader

        return DaliLoader
    from hpckd.data.torch_loader import TorchLoader

    return TorchLoader
