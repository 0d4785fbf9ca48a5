"""torchvision-v2 DataLoader path with the same policies and the same sharding semantics as the DALI loader.

(Named ``torch_loader`` rather than ``torch`` so that running a file of this package as a script can never shadow
the real ``torch``.)
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from hpckd.data.aug import Policy, resize_for_center_crop
from hpckd.data.batch import Batch
from hpckd.data.dali import ShardSpec
from hpckd.errors import DataError


def to_transform(policy: Policy, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """torchvision-v2 rendering of ``policy`` (PIL image in, normalised float CHW tensor out)."""
    s = policy.size
    ops: list = [v2.ToImage()]
    if policy.crop == "rrc":
        ops.append(v2.RandomResizedCrop(s, scale=policy.rrc_scale, antialias=True))
    elif policy.crop == "pad_crop":
        ops += [v2.Resize((s, s), antialias=True), v2.RandomCrop(s, padding=policy.pad)]
    elif policy.crop == "center":
        ops += [v2.Resize(resize_for_center_crop(s), antialias=True), v2.CenterCrop(s)]
    else:
        ops.append(v2.Resize((s, s), antialias=True))
    if policy.flip:
        ops.append(v2.RandomHorizontalFlip())
    if policy.rotate > 0:
        ops.append(v2.RandomRotation(policy.rotate))
    if policy.jitter > 0:
        ops.append(v2.ColorJitter(policy.jitter, policy.jitter, policy.jitter))
    if policy.auto == "randaugment":
        ops.append(v2.RandAugment(num_ops=policy.ra_n, magnitude=policy.ra_m))
    elif policy.auto == "autoaugment_cifar":
        ops.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
    elif policy.auto == "autoaugment_imagenet":
        ops.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    elif policy.auto == "trivialaugment":
        ops.append(v2.TrivialAugmentWide())
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if policy.cutout > 0:
        side = policy.cutout / s
        ops.append(v2.RandomErasing(p=1.0, scale=(side * side, side * side), ratio=(1.0, 1.0), value=0))
    ops.append(v2.Normalize(mean=list(mean), std=list(std)))
    return v2.Compose(ops)


class ViewsDataset(Dataset):
    """Sample i -> (global id, {view: tensor}); every view is its own random draw of the same image."""

    def __init__(self, files: Sequence[str], views: dict[str, Policy], mean, std) -> None:
        self.files = list(files)
        self.transforms = {name: to_transform(p, mean, std) for name, p in views.items()}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            with Image.open(self.files[i]) as img:
                img = img.convert("RGB")
        except Exception as exc:
            raise DataError(f"cannot decode {self.files[i]} ({type(exc).__name__})") from None
        return i, {name: t(img) for name, t in self.transforms.items()}


class ShardSampler(Sampler[int]):
    """Training: a seeded global permutation per epoch, the same number of samples on every rank.
    Evaluation: the contiguous shard of this rank, unpadded (same ranges as DALI's reader)."""

    def __init__(self, n: int, shard: ShardSpec, train: bool, seed: int, per_rank_batch: int) -> None:
        self.n, self.shard, self.train, self.seed, self.b = n, shard, train, seed, per_rank_batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.train:
            start = self.n * self.shard.shard_id // self.shard.num_shards
            end = self.n * (self.shard.shard_id + 1) // self.shard.num_shards
            return iter(range(start, end))
        order = np.random.default_rng((self.seed, self.epoch)).permutation(self.n)
        take = len(self) * self.shard.num_shards
        return iter(order[:take][self.shard.shard_id :: self.shard.num_shards].tolist())

    def __len__(self) -> int:
        if not self.train:
            return self.n * (self.shard.shard_id + 1) // self.shard.num_shards - self.n * self.shard.shard_id // self.shard.num_shards
        return (self.n // self.shard.num_shards) // self.b * self.b


class TorchLoader:
    def __init__(self, files: Sequence[str], labels: Sequence[int], views: dict[str, Policy], *, batch_size: int,
                 shard: ShardSpec, train: bool, seed: int, num_threads: int, device: torch.device,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.sampler = ShardSampler(len(files), shard, train, seed, batch_size)
        if train and len(self.sampler) == 0:
            raise DataError(f"{len(files)} training images are fewer than one batch of {batch_size} per rank x {shard.num_shards} ranks")
        self.loader = DataLoader(ViewsDataset(files, views, mean, std), batch_size=batch_size, sampler=self.sampler,
                                 num_workers=num_threads, drop_last=train, pin_memory=device.type == "cuda",
                                 persistent_workers=num_threads > 0)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
        self.device = device
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Batch]:
        for index, views in self.loader:
            index = index.to(self.device, dtype=torch.int64)
            views = {k: v.to(self.device, non_blocking=True) for k, v in views.items()}
            yield Batch(views=views, labels=self.labels[index], index=index, epoch=self.epoch)
