"""Collectives of ``teacher_parallel`` serving: who owns which teacher, gathering views, returning logits.

With W ranks and T teachers, teacher k lives on rank ``k % W`` only, so an ensemble needs 1/W of the memory per
rank. Each step:

1. every rank learns every rank's batch size (:func:`gather_sizes`; the last batch may be uneven), on the host,
2. each view the teachers look at is all-gathered (:func:`gather_chunks`), kept as one chunk per source rank,
3. each rank runs its teachers on every chunk (in :mod:`hpckd.teachers.serving`),
4. logits go back to the rank that owns the samples (:func:`exchange_all_to_all`, or :func:`exchange_all_gather`).

Step 3 runs one forward per source chunk, with exactly the shape plain mode uses on that source rank, so both modes
execute the same kernels on the same inputs and agree bit for bit; the exchange only moves bits.

Why the sizes travel on the host (issue 17: no device sync per micro-step): the sizes decide the shapes of steps 2
to 4, so the host must know them. Gathered as a device tensor (NCCL), reading them back would wait for everything
queued on the device, every step. They are exchanged instead as CPU tensors over a gloo group
(:func:`hpckd.dist.control_group`, created once by every rank; the default group itself when it is gloo) into
numpy-owned buffers, so no torch tensor is read on the host at all. Knowing them without any communication was the
other choice: a training micro-batch is the same size on every rank (the loaders drop the uneven last batch,
:func:`hpckd.data.sharding.steps_per_epoch`; the batch ops double or keep the rows, and CutMixPick keeps
``n_keep(k * m_g)`` rows of each mixing group, whose sizes m_g are the same on every rank because rank r holds the
positions ``r + W i``). But evaluation calls the same serving path with an uneven last batch and the serving layer
cannot tell the two apart, and a wrong guess would misplace rows or leave the ranks waiting in mismatched
collectives; a tiny host all-gather of W integers costs no device time and cannot be wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from hpckd.dist import control_group

EXCHANGES: tuple[str, ...] = ("all_to_all", "all_gather")


def owner(teacher: int, world_size: int) -> int:
    """The rank that runs ``teacher`` (round robin)."""
    return teacher % world_size


def owned(rank: int, world_size: int, num_teachers: int) -> list[int]:
    """Teacher indices run by ``rank``, ascending."""
    return [k for k in range(num_teachers) if owner(k, world_size) == rank]


def gather_sizes(n: int, device: torch.device, group: dist.ProcessGroup | None = None) -> list[int]:
    """Every rank's local batch size, exchanged on the host (module docstring): over the gloo control group when
    ``group`` is the default one, over ``group`` itself when it is gloo. A group of another backend (a sub-group of
    NCCL ranks, which no caller in hpckd makes) falls back to gathering on ``device`` and reading the result back."""
    world = dist.get_world_size(group)
    if world == 1:
        return [n]
    host_group = _host_group(group)
    if host_group is None:
        mine = torch.tensor([n], dtype=torch.int64, device=device)
        gathered = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine, group=group)
        return [int(t.item()) for t in gathered]
    sizes = np.zeros(world, np.int64)
    # The receive buffers are views of numpy memory: the sizes are read from numpy, not from a torch tensor.
    dist.all_gather(list(torch.from_numpy(sizes).split(1)), torch.tensor([n], dtype=torch.int64), group=host_group)
    return [int(v) for v in sizes]


def _host_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """A gloo group over the ranks of ``group`` (None: the default group): the control group, or ``group`` itself
    when it is gloo; None when there is none."""
    if group is None or group is dist.group.WORLD:
        return control_group()
    return group if dist.get_backend(group) == "gloo" else None


def gather_chunks(x: torch.Tensor, sizes: Sequence[int], group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """All ranks' ``x`` (padded to the largest batch for the collective), one chunk per source rank."""
    longest = max(sizes)
    x = x.contiguous()
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    buffers = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(buffers, x, group=group)
    return [buf[:n] for buf, n in zip(buffers, sizes)]


def exchange_all_to_all(
    outputs: dict[int, list[torch.Tensor]],
    sizes: Sequence[int],
    num_teachers: int,
    num_classes: int,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """Send each rank the rows of its own samples; return all teachers' (n_local, C) fp32 logits.

    ``outputs[k][j]`` is teacher k's (sizes[j], C) logits for rank j's chunk, for the teachers this rank owns.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine, counts = owned(rank, world, num_teachers), _counts(world, num_teachers)
    send_parts = [outputs[k][j].reshape(-1) for j in range(world) for k in mine]
    send = torch.cat(send_parts) if send_parts else torch.empty(0, device=device)
    send_splits = [sizes[j] * len(mine) * num_classes for j in range(world)]
    recv_splits = [sizes[rank] * count * num_classes for count in counts]
    recv = torch.empty(sum(recv_splits), dtype=torch.float32, device=device)
    dist.all_to_all_single(recv, send.float(), recv_splits, send_splits, group=group)
    blocks = [part.view(count, sizes[rank], num_classes) for count, part in zip(counts, recv.split(recv_splits))]
    return _by_teacher(blocks, num_teachers)


def exchange_all_gather(
    outputs: dict[int, list[torch.Tensor]],
    sizes: Sequence[int],
    num_teachers: int,
    num_classes: int,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """Like :func:`exchange_all_to_all`, but every rank receives every teacher's logits for the whole global batch
    and keeps its own rows: W times the traffic, for backends or debugging where all-to-all is unavailable."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    slots = max(_counts(world, num_teachers))
    total = sum(sizes)
    block = torch.zeros(slots, total, num_classes, dtype=torch.float32, device=device)
    for slot, k in enumerate(owned(rank, world, num_teachers)):
        block[slot] = torch.cat(outputs[k])
    buffers = [torch.empty_like(block) for _ in range(world)]
    dist.all_gather(buffers, block, group=group)
    start = sum(sizes[:rank])
    return _by_teacher([buf[:, start : start + sizes[rank]] for buf in buffers], num_teachers)


def _counts(world: int, num_teachers: int) -> list[int]:
    """How many teachers each rank runs."""
    return [len(owned(rank, world, num_teachers)) for rank in range(world)]


def _by_teacher(blocks: Sequence[torch.Tensor], num_teachers: int) -> list[torch.Tensor]:
    """Teacher k's (n_local, C) logits, from one block per source rank whose slot j holds that rank's j-th teacher."""
    result: list[torch.Tensor] = [torch.empty(0)] * num_teachers
    for source, block in enumerate(blocks):
        for slot, k in enumerate(owned(source, len(blocks), num_teachers)):
            result[k] = block[slot]
    return result
