"""Which samples each rank reads in each epoch: a pure function of (seed, epoch, rank, world size).

Both loaders (DALI and torch) take their order from here, so they agree with each other and a resumed run can
recompute the exact order of any epoch without replaying the ones before it.

Training: one seeded global permutation per epoch, cut to ``steps * batch * world`` samples (every rank takes
the same number of steps; DDP needs that), dealt round-robin to the ranks, so shards are disjoint.
Evaluation: rank r reads the contiguous range ``[n*r/W, n*(r+1)/W)``, unpadded, so every sample is seen exactly
once across ranks whatever the world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpckd.errors import DataError


@dataclass(frozen=True)
class ShardSpec:
    shard_id: int = 0
    num_shards: int = 1


def shard_range(n: int, shard: ShardSpec) -> tuple[int, int]:
    """[start, end) of the contiguous evaluation shard of ``shard`` (sizes differ by at most one)."""
    return n * shard.shard_id // shard.num_shards, n * (shard.shard_id + 1) // shard.num_shards


def steps_per_epoch(n: int, shard: ShardSpec, batch_size: int, train: bool) -> int:
    """Batches per epoch on this rank: equal on all ranks for training, ceil(shard / batch) for evaluation."""
    if train:
        return (n // shard.num_shards) // batch_size
    start, end = shard_range(n, shard)
    return -(-(end - start) // batch_size)


def epoch_order(n: int, shard: ShardSpec, *, batch_size: int, train: bool, seed: int, epoch: int) -> np.ndarray:
    """Sample ids this rank reads in ``epoch``, in reading order (int64)."""
    if not train:
        start, end = shard_range(n, shard)
        return np.arange(start, end, dtype=np.int64)
    take = steps_per_epoch(n, shard, batch_size, train) * batch_size * shard.num_shards
    order = np.random.default_rng((seed, epoch)).permutation(n)
    return order[:take][shard.shard_id :: shard.num_shards].astype(np.int64)


def check_trainable(n: int, shard: ShardSpec, batch_size: int) -> None:
    if steps_per_epoch(n, shard, batch_size, True) == 0:
        raise DataError(f"{n} training images are fewer than one batch of {batch_size} per rank x {shard.num_shards} ranks")


class ResumableEpochs:
    """Epoch / step bookkeeping shared by the loaders (``set_epoch``, ``state_dict``, ``load_state_dict``).

    ``step`` counts the batches handed out in the current epoch. After ``load_state_dict({"epoch": e,
    "step": s})`` the next pass over the loader starts at batch ``s`` of epoch ``e``; ``set_epoch(e)`` with the
    same epoch keeps that start, another epoch clears it. A pass that ends (or a new pass) starts at 0 again.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.step = 0
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start = 0
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, step = int(state["epoch"]), int(state["step"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"loader state must be a dict with integer 'epoch' and 'step', got {state!r}") from None
        if epoch < 0 or step < 0:
            raise DataError(f"loader state has a negative epoch or step: {state!r}")
        self.epoch, self.step, self._start = epoch, step, step

    def begin_pass(self) -> int:
        """Called when a pass starts; returns the first batch to produce."""
        start, self._start = self._start, 0
        self.step = start
        return start


class EpochLoader:
    """The loader API the training loop uses (length, epochs, resumable position), shared by the DALI and torch
    loaders; a subclass sets ``self.state`` (a :class:`ResumableEpochs`) and ``self.steps_per_epoch``."""

    state: ResumableEpochs
    steps_per_epoch: int

    @property
    def epoch(self) -> int:
        return self.state.epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.state.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state.load_state_dict(state)
