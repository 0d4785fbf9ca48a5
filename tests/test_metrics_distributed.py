"""2 real processes (torch.distributed, gloo): the Evaluator, TStdDev and IoUAccumulator reduce to exactly the
1-rank values, with uneven shards and loader padding."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpckd.metrics import Evaluator, IoUAccumulator, TStdDev

pytestmark = pytest.mark.dist

C, N, WORLD, BATCH = 6, 103, 2, 8
OPTIONS = {"tstddev_group_size": 10, "n_bins": 10}


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(N, C, generator=g, dtype=torch.float64) * 2
    t = s + torch.randn(N, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    maps_a, maps_b = torch.randn(N, 5, 5, generator=g), torch.randn(N, 5, 5, generator=g)
    return {"s": s, "t": t, "y": y, "a": maps_a, "b": maps_b}


def _interleaved_shard(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DistributedSampler order without shuffling: rank r takes r, r + W, ...; the short rank is padded by
    repeating sample 0 (marked invalid), so both ranks run the same number of steps."""
    idx = torch.arange(rank, N, WORLD)
    per_rank = -(-N // WORLD)
    pad = per_rank - idx.numel()
    valid = torch.cat([torch.ones(idx.numel(), dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])
    return torch.cat([idx, torch.zeros(pad, dtype=torch.long)]), valid


def _run(
    d: dict[str, torch.Tensor], idx: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor | None, batch: int
):
    ev = Evaluator(C, **OPTIONS)
    ts = TStdDev(C, group_size=10)
    iou = IoUAccumulator(threshold=0.4)
    for a in range(0, idx.numel(), batch):
        i, v = idx[a : a + batch], valid[a : a + batch]
        p = None if positions is None else positions[a : a + batch]
        ev.update(d["s"][i], d["y"][i], teacher_logits=d["t"][i], valid=v, positions=p)
        ts.update(d["t"][i], positions=p, valid=v)
        iou.update(d["a"][i], d["b"][i], valid=v)
    return {"evaluator": ev.compute(), "tstddev": ts.compute(), "iou": iou.compute()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        d = _data()
        # 1) interleaved shards (DistributedSampler), default stream positions
        idx, valid = _interleaved_shard(rank)
        interleaved = _run(d, idx, valid, None, BATCH)
        # 2) uneven contiguous shards (60 / 43, e.g. DALI-style), explicit positions, padding to equal steps
        lo, hi = (0, 60) if rank == 0 else (60, N)
        idx2 = torch.cat([torch.arange(lo, hi), torch.zeros(60 - (hi - lo), dtype=torch.long)])
        valid2 = torch.arange(60) < (hi - lo)
        contiguous = _run(d, idx2, valid2, idx2.clone(), 16 if rank == 0 else 5)
        torch.save({"interleaved": interleaved, "contiguous": contiguous}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_ranks_equal_one_rank_exactly(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    d = _data()
    all_idx = torch.arange(N)
    expected = _run(d, all_idx, torch.ones(N, dtype=torch.bool), None, 13)
    assert ranks[0] == ranks[1]  # every rank reports the same values
    for layout in ("interleaved", "contiguous"):
        got = ranks[0][layout]
        assert got["evaluator"] == expected["evaluator"], layout  # bit-identical, not approximately equal
        assert got["tstddev"] == expected["tstddev"], layout
        assert got["iou"]["iou"] == expected["iou"]["iou"]
        assert got["iou"]["iou_pooled"] == expected["iou"]["iou_pooled"]
        assert got["iou"]["iou_count"] == N
    # and the shared values are right, not just equal: spot-check against numpy
    s, t, y = d["s"].numpy(), d["t"].numpy(), d["y"].numpy()
    ev = expected["evaluator"]
    assert ev["count"] == N and ev["accuracy"] == np.mean(s.argmax(1) == y)
    assert ev["top1_agreement"] == np.mean(s.argmax(1) == t.argmax(1))
    pt = np.exp(t - t.max(1, keepdims=True))
    pt /= pt.sum(1, keepdims=True)
    u = pt[:100].reshape(10, 10, C).mean(axis=1)
    assert abs(expected["tstddev"]["tstddev"] - np.sqrt(u.var(axis=0, ddof=1)).mean()) < 1e-7
    assert ev["tstddev"] == expected["tstddev"]["tstddev"]
