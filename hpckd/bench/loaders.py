"""Loader throughput: DALI (GPU ``mixed`` decoding when there is a GPU, CPU otherwise), hpckd's torch loader, and the
stock torchvision ``ImageFolder`` + transforms ``DataLoader`` (the baseline), for the imagenet policies ``weak``
(RandomResizedCrop + flip + colour jitter 0.4) and ``strong`` (weak + RandAugment n=2, m=10) on generated
ImageNet-like JPEGs; plus ``dali-inputs``: the rate at which one process prepares DALI's inputs (file reads,
JPEG header parsing, parameter drawing), the Python-side ceiling of one training process.

Images/s counts images delivered on the training device, one view each.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpckd.bench import timing
from hpckd.bench.common import FULL_DATA, MEAN, STD, Context, dataset, has_dali
from hpckd.data.aug import train_policy
from hpckd.data.index import build_index
from hpckd.data.sharding import ShardSpec

SIZES = {
    "tiny": dict(classes=4, per_class=32, height=60, width=80, crop=48, batch=16, threads=2, warmup=1, batches=6,
                 repeats=3),
    "small": dict(classes=16, per_class=16, height=375, width=500, crop=224, batch=32, threads=2, warmup=3,
                  batches=24, repeats=4),
    "full": dict(**FULL_DATA, crop=224, batch=128, threads=16, warmup=3,
                 batches=40, repeats=5),
}
POLICIES = ("weak", "strong")


def torchvision_loader(root: Path, strength: str, crop: int, batch: int, workers: int, pin: bool):
    """The stock baseline: ImageFolder + v2 transforms in a DataLoader."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    ops = [v2.RandomResizedCrop(crop, antialias=True), v2.RandomHorizontalFlip(), v2.ColorJitter(0.4, 0.4, 0.4)]
    if strength == "strong":
        ops.append(v2.RandAugment(num_ops=2, magnitude=10))
    transform = v2.Compose([v2.PILToTensor(), *ops, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    return DataLoader(ImageFolder(str(root), transform=transform), batch_size=batch, shuffle=True, drop_last=True,
                      num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)


def hpckd_loader(kind: str, root: Path, strength: str, crop: int, batch: int, threads: int, device: torch.device,
                 read_ahead: int | None = None):
    index = build_index(root, cache="off")
    views = {"student": train_policy("imagenet", strength, crop)}
    extra: dict[str, Any] = {}
    if kind == "dali":
        from hpckd.data.dali import DaliLoader as cls

        extra = {} if read_ahead is None else {"read_ahead": read_ahead}
    else:
        from hpckd.data.torch_loader import TorchLoader as cls
    return cls(index.files, index.labels, views, batch_size=batch, shard=ShardSpec(), train=True, seed=0,
               num_threads=threads, device=device, mean=MEAN, std=STD, **extra)


def batch_durations(loader, device: torch.device, warmup: int, batches: int) -> tuple[list[float], list[int]]:
    """Per-batch seconds and images of ``batches`` batches after ``warmup``, over as many passes as needed; the
    device is synchronised at each timestamp (the batch is on the device, ready to use)."""
    durations: list[float] = []
    counts: list[int] = []
    seen, epoch, last = 0, 0, None
    while len(durations) < batches:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for item in loader:
            x = item.views["student"] if hasattr(item, "views") else item[0]
            x = x.to(device, non_blocking=True)
            timing.sync(device)
            now = time.perf_counter()
            seen += 1
            if last is not None and seen > warmup:
                durations.append(now - last)
                counts.append(int(x.shape[0]))
            last = now
            if len(durations) >= batches:
                break
        epoch += 1
        last = None  # a new pass starts its workers / pipeline: not a steady-state interval
    return durations, counts


def dali_input_rate(root: Path, strength: str, crop: int, batch: int, batches: int) -> tuple[list[float], list[int]]:
    """Per-batch seconds for one process to read the files, parse the JPEG headers and draw the augmentation
    parameters of a batch (:meth:`hpckd.data.dali.BatchFeeder.inputs`, what the read-ahead thread does)."""
    from hpckd.data.dali import BatchFeeder, read_batches
    from hpckd.data.sharding import epoch_order
    from hpckd.data.sources import as_source

    index = build_index(root, cache="off")
    source = as_source(index.files)
    feeder = BatchFeeder(source, {"student": train_policy("imagenet", strength, crop)}, seed=0, read_ahead=0)
    durations, counts, epoch = [], [], 0
    while len(durations) < batches:
        order = epoch_order(len(source), ShardSpec(), batch_size=batch, train=True, seed=0, epoch=epoch)
        batches_iter = read_batches(source, order, 0, batch)
        while len(durations) < batches:
            t0 = time.perf_counter()
            item = next(batches_iter, None)
            if item is None:
                break
            ids, data = item
            feeder.inputs(np.asarray(ids), data, epoch)
            durations.append(time.perf_counter() - t0)
            counts.append(len(ids))
        epoch += 1
    return durations, counts


def run(ctx: Context) -> dict[str, Any]:
    s = ctx.pick(SIZES)
    root = dataset(ctx, s["classes"], s["per_class"], s["height"], s["width"]) / "train"
    kinds = (["dali"] if has_dali() else []) + ["hpckd-torch", "torchvision"]
    rows: list[dict[str, Any]] = []
    for strength in POLICIES:
        base = f"{strength}/torchvision"
        for kind in kinds:
            with timing.Memory(ctx.device) as mem:
                if kind == "torchvision":
                    loader = torchvision_loader(root, strength, s["crop"], s["batch"], s["threads"], ctx.cuda)
                else:
                    loader = hpckd_loader(kind, root, strength, s["crop"], s["batch"], s["threads"], ctx.device)
                d, c = batch_durations(loader, ctx.device, s["warmup"], s["batches"])
                del loader
                note = {"dali": "GPU mixed decode" if ctx.cuda else "CPU pipeline"}.get(kind, "")
                rows.append(timing.row(f"{strength}/{kind}", timing.window_rates(d, c, s["repeats"]), baseline=base,
                                       memory=mem.peaks(), note=note))
        with timing.Memory(ctx.device) as mem:
            d, c = dali_input_rate(root, strength, s["crop"], s["batch"], s["batches"])
            rows.append(timing.row(f"{strength}/dali-inputs", timing.window_rates(d, c, s["repeats"]), baseline=base,
                                   memory=mem.peaks(), note="1 process: file reads, header parsing, parameters"))
    setup = {**s, "images": s["classes"] * s["per_class"], "jpeg": f"{s['height']}x{s['width']}",
             "dali": "yes" if has_dali() else "not installed"}
    return {"what": __doc__.split("\n\n")[0].replace("\n", " "), "setup": setup, "rows": rows}
