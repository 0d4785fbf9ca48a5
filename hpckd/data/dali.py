"""NVIDIA DALI loaders: sharded file reader, GPU ('mixed') or CPU decoding, the named policies, one output per view.

One reader feeds one decode; each distinct view (student, and teachers given their own policy) branches off the
decoded image and gets its own augmentation, so all views show the same samples. The reader's labels are the
samples' global ids, which the loader maps to class labels on the device: the ``Batch.index`` comes for free.

Sharding: ``shard_id = rank``, ``num_shards = world size``. Training reads a global permutation (shuffled once
by the seed, then ``shuffle_after_epoch`` with the same reader seed on every rank, so shards never overlap) and
every rank takes the same number of steps per epoch (DDP needs that); evaluation reads each shard once with
``pad_last_batch`` and the iterator's PARTIAL policy, so every validation sample is seen exactly once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from hpckd.data.aug import Policy, resize_for_center_crop
from hpckd.data.batch import Batch
from hpckd.errors import DataError

READER = "Reader"

# DALI announces renamed operators when its auto-augment module loads; nothing for our users to act on.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"nvidia\.dali\..*")


@dataclass(frozen=True)
class ShardSpec:
    shard_id: int = 0
    num_shards: int = 1


def _dali():
    try:
        import nvidia.dali as dali  # noqa: F401
    except ImportError:
        raise DataError("data.loader=dali needs NVIDIA DALI: pip install nvidia-dali-cuda120 (or set data.loader=torch)") from None
    return dali


def apply_policy(images, policy: Policy, mean: Sequence[float], std: Sequence[float]):
    """DALI graph of ``policy`` on decoded HWC uint8 ``images``; returns normalised CHW float images."""
    from nvidia.dali import fn, types

    s = policy.size
    crop = None
    if policy.crop == "rrc":
        images = fn.random_resized_crop(images, size=(s, s), random_area=list(policy.rrc_scale))
    elif policy.crop == "pad_crop":
        images = fn.resize(images, size=(s, s))
        anchor = fn.random.uniform(values=[float(v) for v in range(-policy.pad, policy.pad + 1)], shape=2)
        images = fn.slice(images, anchor, [float(s), float(s)], axes=[0, 1], normalized_anchor=False, normalized_shape=False,
                          out_of_bounds_policy="pad", fill_values=0)
    elif policy.crop == "center":
        images = fn.resize(images, resize_shorter=resize_for_center_crop(s))
        crop = (s, s)
    else:
        images = fn.resize(images, size=(s, s))
    if policy.flip:
        images = fn.flip(images, horizontal=fn.random.coin_flip(dtype=types.INT32))
    if policy.rotate > 0:
        images = fn.rotate(images, angle=fn.random.uniform(range=(-policy.rotate, policy.rotate)), keep_size=True, fill_value=0)
    if policy.jitter > 0:
        lo, hi = 1.0 - policy.jitter, 1.0 + policy.jitter
        images = fn.color_twist(images, brightness=fn.random.uniform(range=(lo, hi)),
                                contrast=fn.random.uniform(range=(lo, hi)), saturation=fn.random.uniform(range=(lo, hi)))
    if policy.auto:
        images = _auto_augment(images, policy)
    if policy.cutout > 0:
        half = policy.cutout / 2
        centre = fn.random.uniform(range=(0.0, float(s)), shape=2)
        images = fn.erase(images, anchor=centre - half, shape=[float(policy.cutout)] * 2, axis_names="HW", fill_value=0)
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", crop=crop,
                                    mean=[255.0 * m for m in mean], std=[255.0 * v for v in std])


def _auto_augment(images, policy: Policy):
    from nvidia.dali.auto_aug import auto_augment, rand_augment, trivial_augment

    if policy.auto == "randaugment":
        return rand_augment.rand_augment(images, n=policy.ra_n, m=policy.ra_m, fill_value=0)
    if policy.auto == "autoaugment_cifar":
        return auto_augment.auto_augment(images, policy_name="reduced_cifar10", fill_value=0)
    if policy.auto == "autoaugment_imagenet":
        return auto_augment.auto_augment(images, policy_name="image_net", fill_value=0)
    if policy.auto == "trivialaugment":
        return trivial_augment.trivial_augment_wide(images, fill_value=0)
    raise DataError(f"unknown automatic augmentation {policy.auto!r}")


def build_pipeline(files: Sequence[str], views: dict[str, Policy], *, batch_size: int, shard: ShardSpec, train: bool,
                   seed: int, num_threads: int, device_id: int | None, mean: Sequence[float], std: Sequence[float]):
    """A DALI pipeline yielding (sample ids, one image tensor per view name, in ``views`` order)."""
    _dali()
    from nvidia.dali import fn, pipeline_def, types

    order = np.arange(len(files))
    if train:  # the first epoch must be shuffled too; shuffle_after_epoch only reshuffles later epochs
        order = np.random.default_rng(seed).permutation(len(files))
    ordered_files = [files[i] for i in order]
    sample_ids = [int(i) for i in order]

    @pipeline_def(enable_conditionals=True)
    def graph():
        encoded, ids = fn.readers.file(files=ordered_files, labels=sample_ids, shard_id=shard.shard_id,
                                       num_shards=shard.num_shards, shuffle_after_epoch=train,
                                       stick_to_shard=not train, pad_last_batch=True, seed=seed, name=READER)
        decoded = fn.decoders.image(encoded, device="mixed" if device_id is not None else "cpu", output_type=types.RGB)
        return (ids, *[apply_policy(decoded, policy, mean, std) for policy in views.values()])

    # Augmentation randomness differs per rank; the reader's seed (above) is shared so the shards agree.
    return graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                 seed=seed + 7919 * (shard.shard_id + 1), prefetch_queue_depth=2)


class DaliLoader:
    """Iterates :class:`Batch` objects from a DALI pipeline; one pass = one epoch.

    Args:
        labels: class label of every sample id (the index's labels).
        steps_per_epoch: training only; every rank stops after this many batches (then drains the rest of its
            shard so the reader stays aligned with epoch boundaries).
    """

    def __init__(self, files: Sequence[str], labels: Sequence[int], views: dict[str, Policy], *, batch_size: int,
                 shard: ShardSpec, train: bool, seed: int, num_threads: int, device: torch.device,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        device_id = device.index if device.type == "cuda" else None
        if device.type == "cuda" and device_id is None:
            device_id = torch.cuda.current_device()
        self.view_names = list(views)
        self.pipeline = build_pipeline(files, views, batch_size=batch_size, shard=shard, train=train, seed=seed,
                                       num_threads=num_threads, device_id=device_id, mean=mean, std=std)
        self.iterator = DALIGenericIterator(
            self.pipeline, ["index", *self.view_names], reader_name=READER, auto_reset=True,
            last_batch_policy=LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL,
        )
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
        self.device = device
        self.train = train
        self.epoch = 0
        n, b = len(files), batch_size
        smallest_shard = n // shard.num_shards  # shards are contiguous ranges differing by at most one sample
        self.steps_per_epoch = smallest_shard // b if train else -(-_shard_size(n, shard) // b)
        if train and self.steps_per_epoch == 0:
            raise DataError(f"{n} training images are fewer than one batch of {b} per rank x {shard.num_shards} ranks")

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        step = 0
        try:
            for outputs in self.iterator:
                if self.train and step >= self.steps_per_epoch:
                    continue  # drain: keeps the reader on epoch boundaries
                out = outputs[0]
                index = out["index"].reshape(-1).to(self.device, dtype=torch.int64)
                views = {name: out[name].to(self.device, non_blocking=True) for name in self.view_names}
                step += 1
                yield Batch(views=views, labels=self.labels[index], index=index, epoch=self.epoch)
        except RuntimeError as exc:
            text = str(exc).strip().splitlines()
            raise DataError(f"DALI failed while reading data: {text[0] if text else exc}") from None


def _shard_size(n: int, shard: ShardSpec) -> int:
    start = n * shard.shard_id // shard.num_shards
    end = n * (shard.shard_id + 1) // shard.num_shards
    return end - start
