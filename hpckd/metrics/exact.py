"""Order-independent sums: fixed-point int64 accumulation and the all-reduce of sufficient statistics.

Why fixed point: a float sum depends on the order of its addends, so a split evaluated on 2 ranks (each summing
its half, then adding the halves) would differ from 1 rank in the last bits. Integer addition is associative, so
each per-sample value is first rounded to a multiple of ``2**-FRACTION_BITS`` and the sums are kept as int64.
Any partition of the samples into ranks and batches then gives bit-identical totals, and the only error is the
rounding of each addend (at most ``2**-(FRACTION_BITS+1)`` ~ 1.9e-9, far below float32 logit precision).

Capacity: ``2**(63-FRACTION_BITS)`` ~ 3.4e10 in absolute value per sum (e.g. a summed NLL of 25 nats over
a billion samples). One addend saturates at ``MAX_ADDEND`` (32768): a per-sample NLL that large only comes from a
diverged model, and saturating keeps the sum from wrapping around. NaN addends count as 0; callers count
non-finite samples themselves and report NaN.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

FRACTION_BITS = 28
_SCALE = float(2**FRACTION_BITS)
# One addend saturates at this magnitude, so that about 2**20 worst-case addends still fit in an int64.
MAX_ADDEND = float(2 ** (63 - FRACTION_BITS - 20))


def to_fixed(values: torch.Tensor) -> torch.Tensor:
    """Round float values to int64 fixed point (``round(x * 2**FRACTION_BITS)``), elementwise.

    Values saturate at +-``MAX_ADDEND``; NaN becomes 0 (callers count non-finite samples and report NaN).
    """
    clean = torch.nan_to_num(values.double(), nan=0.0).clamp(-MAX_ADDEND, MAX_ADDEND)
    return torch.round(clean * _SCALE).to(torch.int64)


def from_fixed(values: torch.Tensor) -> torch.Tensor:
    """The float64 value of a fixed-point int64 tensor."""
    return values.double() / _SCALE


def fixed_sum(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Exact fixed-point sum of float values (int64), over all elements or along ``dim``."""
    fixed = to_fixed(values)
    return fixed.sum() if dim is None else fixed.sum(dim=dim)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _comm_device(tensor: torch.Tensor, group: object | None) -> torch.device:
    # NCCL only moves CUDA tensors; gloo and MPI take tensors where they are.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_int64(tensors: dict[str, torch.Tensor], group: object | None = None) -> dict[str, torch.Tensor]:
    """Sum int64 tensors over all ranks of ``group`` in one collective; returns new tensors (inputs untouched).

    Without an initialised process group this is the identity (a copy), so the same code runs on 1 rank.
    """
    names = sorted(tensors)
    for name in names:
        if tensors[name].dtype != torch.int64:
            raise TypeError(f"sufficient statistic {name!r} must be int64 for an exact all-reduce")
    if not names:
        return {}
    flat = torch.cat([tensors[n].reshape(-1) for n in names])
    if is_distributed():
        device = _comm_device(flat, group)
        moved = flat.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
        flat = moved.to(flat.device)
    else:
        flat = flat.clone()
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name in names:
        n = tensors[name].numel()
        out[name] = flat[offset : offset + n].reshape(tensors[name].shape)
        offset += n
    return out


def all_reduce_max(value: int, group: object | None = None, device: torch.device | None = None) -> int:
    """The maximum of an integer over the ranks of ``group`` (the value itself on 1 rank)."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device or torch.device("cpu"))
    t = t.to(_comm_device(t, group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def rank_and_world(group: object | None = None) -> tuple[int, int]:
    """(rank, world size) in ``group``, or (0, 1) without torch.distributed."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)
