"""torchvision-v2 DataLoader path with the same policies, parameters and sharding as the DALI loader.

Each sample's view is rendered by :func:`hpckd.data.render_torch.render` from parameters drawn by
:func:`hpckd.data.params.sample_params` under the key (seed, epoch, view name) -- the same parameters the DALI
loader draws -- so a sample's augmentation does not depend on the worker that loads it, the batch it lands in or
the samples before it. With the order of :func:`hpckd.data.sharding.epoch_order`, every epoch is a pure function
of (seed, epoch, rank) and resuming at any step is exact (:meth:`TorchLoader.load_state_dict`).

(Named ``torch_loader`` rather than ``torch`` so that running a file of this package as a script can never shadow
the real ``torch``.)
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hpckd.data.aug import Policy
from hpckd.data.batch import Batch, ImageFormat, host_array
from hpckd.data.params import sample_params, view_key
from hpckd.data.render_torch import render
from hpckd.data.sharding import EpochLoader, ResumableEpochs, ShardSpec, check_trainable, epoch_order, steps_per_epoch
from hpckd.data.index_cache import stale_hint
from hpckd.data.sources import as_source, decode_rgb
from hpckd.errors import DataError


class ViewsDataset(Dataset):
    """Key (sample id, epoch) -> (sample id, {view: tensor}, {view: parameters})."""

    def __init__(self, source, views: dict[str, Policy], mean, std, seed: int) -> None:
        self.source = as_source(source)
        self.views = dict(views)
        self.mean, self.std, self.seed = list(mean), list(std), seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        i, epoch = key
        data = self.source.read(i)
        try:
            pixels = decode_rgb(data, self.source.encoded, self.source.name(i))
        except DataError as exc:
            hint = stale_hint(self.source.name(i)) if self.source.encoded else ""
            raise DataError(f"{exc}{hint}") from exc
        img = torch.from_numpy(pixels).permute(2, 0, 1)
        size = np.array([[pixels.shape[0], pixels.shape[1]]])
        out, params = {}, {}
        for name, policy in self.views.items():
            p = {k: v[0] for k, v in sample_params(policy, view_key(self.seed, epoch, name), np.array([i]), size).items()}
            out[name] = render(img, policy, p, self.mean, self.std)
            params[name] = p
        return i, out, params


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (sample id, epoch) keys of this rank's order for one epoch, from batch ``start`` on."""

    def __init__(self, n: int, shard: ShardSpec, train: bool, seed: int, batch_size: int) -> None:
        self.n, self.shard, self.train, self.seed, self.b = n, shard, train, seed, batch_size
        self.epoch = 0
        self.start = 0

    def _order(self) -> np.ndarray:
        return epoch_order(self.n, self.shard, batch_size=self.b, train=self.train, seed=self.seed, epoch=self.epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(int(i), self.epoch) for i in self._order()[self.start * self.b :]])

    def __len__(self) -> int:
        return max(0, len(self._order()) - self.start * self.b)


class TorchLoader(EpochLoader):
    """Iterates :class:`Batch` objects; ``len`` = steps per epoch; ``state_dict``/``load_state_dict`` resume exactly.

    ``batch.aug[view]`` holds the view's parameters (tensors, one row per sample) for replay.
    """

    def __init__(self, files, labels: Sequence[int], views: dict[str, Policy], *, batch_size: int,
                 shard: ShardSpec, train: bool, seed: int, num_threads: int, device: torch.device,
                 mean: Sequence[float], std: Sequence[float], image_format: ImageFormat = ImageFormat()) -> None:
        source = as_source(files)
        if train:
            check_trainable(len(source), shard, batch_size)
        self.sampler = EpochSampler(len(source), shard, train, seed, batch_size)
        self.loader = DataLoader(ViewsDataset(source, views, mean, std, seed), batch_size=batch_size, sampler=self.sampler,
                                 num_workers=num_threads, drop_last=train, pin_memory=device.type == "cuda",
                                 persistent_workers=num_threads > 0)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
        self.device, self.image_format = device, image_format
        self.steps_per_epoch = steps_per_epoch(len(source), shard, batch_size, train)
        self.state = ResumableEpochs()

    def __iter__(self) -> Iterator[Batch]:
        start = self.state.begin_pass()
        if start >= self.steps_per_epoch:
            return
        self.sampler.epoch, self.sampler.start = self.state.epoch, start
        try:
            for index, views, params in self.loader:
                host = host_array(index)  # the ids while they are on the host (Batch.ids: no device read later)
                # Pinned (pin_memory on CUDA): an asynchronous copy; a blocking one would wait for the device.
                index = index.to(self.device, dtype=torch.int64, non_blocking=True)
                views = {k: self.image_format.apply(v, self.device) for k, v in views.items()}
                self.state.step += 1
                yield Batch(views=views, labels=self.labels[index], index=index, epoch=self.state.epoch,
                            aug=dict(params), host_index=host)
        except DataError as exc:
            if not str(exc).startswith("Caught "):
                raise
            raise type(exc)(worker_error_message(exc)) from exc


def worker_error_message(exc: BaseException) -> str:
    """The original message of an error that a DataLoader worker raised.

    The DataLoader re-raises it in this process as ``type(exc)("Caught X in DataLoader worker N. Original
    Traceback ...")``: the worker's whole traceback inside the message, which must stay one line. The last line of
    that traceback is ``module.X: message``."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else str(exc)
    for cls in type(exc).__mro__:
        prefix = f"{cls.__module__}.{cls.__qualname__}: "
        if last.startswith(prefix):
            return last[len(prefix):]
    return last
