"""What a run reports while it trains: JSON-lines records, a progress bar, optional TensorBoard scalars.

Rank 0 reports; other ranks get inert objects. The same records come out of both backends.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch


class JsonLogger:
    """JSON-lines log; appends one flushed line per record (rank 0 only; others pass ``None``)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def log(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps({"time": round(time.time(), 3), **record}, default=float) + "\n")


class Scalars:
    """TensorBoard scalars under ``out_dir/tensorboard`` when enabled (the package is optional), else nothing.

    The writer opens in :meth:`start`, once the run knows where it resumes: a resumed run purges the events a
    killed session wrote after its last checkpoint (TensorBoard's ``purge_step``), so each step appears once.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.writer = None

    def start(self, purge_step: int | None = None) -> None:
        if self.folder is not None and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # needs `tensorboard`; checked at start-up

            self.writer = SummaryWriter(str(self.folder), purge_step=purge_step)

    def add(self, prefix: str, values: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def progress(iterable: Iterable, desc: str, total: int, enabled: bool) -> Iterable:
    """A tqdm bar on rank 0 when stderr is a terminal (never in log files or CI), else the plain iterable."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
    return iterable


def memory_stats(device: torch.device) -> dict[str, float | None]:
    """Peak GPU memory allocated by torch (GiB, None on CPU) and this process's peak resident memory (GiB)."""
    gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    # ru_maxrss is KiB on Linux.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"gpu_mem_gib": None if gpu is None else round(gpu, 3), "max_rss_gib": round(rss, 3)}


class Throughput:
    """Images per second over the steps since the last :meth:`rate` call (host wall clock; the caller has
    synchronised with the device through the loss check)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.images = 0

    def add(self, images: int) -> None:
        self.images += images

    def rate(self) -> float:
        now = time.perf_counter()
        value = self.images / max(now - self.t0, 1e-9)
        self.t0, self.images = now, 0
        return value
