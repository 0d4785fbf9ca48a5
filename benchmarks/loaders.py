"""Loader throughput: DALI (GPU when present, else CPU) vs the torchvision DataLoader, same JPEGs, same policies.

    python benchmarks/loaders.py                       # 2,048 ImageNet-like JPEGs (375x500), crop 224, batch 128
    python benchmarks/loaders.py --images 256 --batch 32 --crop 160 --threads 2   # a quick CPU run

Measured, in one run, for the policies ``weak`` (RandomResizedCrop + flip + colour jitter) and ``strong`` (weak +
RandAugment n=2, m=10) of the imagenet family:

- ``dali``: :class:`hpckd.data.dali.DaliLoader` (``device='mixed'`` nvJPEG decoding and GPU augmentation when a
  GPU is visible; CPU pipeline otherwise) with ``--threads`` DALI threads and ``--read-ahead`` batches read ahead
  on a background thread (default: the loader's; 0 reads in DALI's callback on the training thread);
- ``hpckd-torch``: :class:`hpckd.data.torch_loader.TorchLoader` (torchvision-v2 functional ops from recorded
  parameters, ``--threads`` DataLoader workers);
- ``torchvision``: the stock baseline, ``torchvision.datasets.ImageFolder`` + ``transforms.v2.Compose`` in a
  ``DataLoader`` with ``--threads`` workers and pinned memory.

Images/s counts training images delivered on the device (one view each), after ``--warmup`` batches, over at
least ``--min-batches`` batches. The hardware (CPU model, cores, GPU) and versions are printed with the table and
written with ``--json``. The generated images are cached in ``--data`` (default: a temp folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from hpckd.data.aug import train_policy
from machine import cpu_model  # benchmarks/machine.py, next to this script
from hpckd.data.index import build_index
from hpckd.data.sharding import ShardSpec
from hpckd.data.synth import SynthSpec, write_imagefolder

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def hardware() -> dict:
    cpu = cpu_model()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    import torchvision

    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "gpu": gpu, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "dali": dali_version, "python": platform.python_version()}


def dataset(folder: Path, images: int, classes: int, height: int, width: int) -> Path:
    root = folder / f"bench_{images}_{classes}_{height}x{width}"
    if not (root / "train").is_dir():
        write_imagefolder(root, SynthSpec(classes=classes, per_class=-(-images // classes), val_per_class=1,
                                          height=height, width=width, seed=0))
    return root / "train"


def torchvision_loader(root: Path, strength: str, crop: int, batch: int, workers: int):
    """The stock baseline: ImageFolder + v2 transforms in a DataLoader."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    ops = [v2.RandomResizedCrop(crop, antialias=True), v2.RandomHorizontalFlip(), v2.ColorJitter(0.4, 0.4, 0.4)]
    if strength == "strong":
        ops.append(v2.RandAugment(num_ops=2, magnitude=10))
    transform = v2.Compose([v2.PILToTensor(), *ops, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    return DataLoader(ImageFolder(str(root), transform=transform), batch_size=batch, shuffle=True, drop_last=True,
                      num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


def hpckd_loader(kind: str, root: Path, strength: str, crop: int, batch: int, threads: int, device: torch.device,
                 read_ahead: int | None = None):
    index = build_index(root, cache="off")
    views = {"student": train_policy("imagenet", strength, crop)}
    extra = {}
    if kind == "dali":
        from hpckd.data.dali import DaliLoader as cls

        extra = {} if read_ahead is None else {"read_ahead": read_ahead}
    else:
        from hpckd.data.torch_loader import TorchLoader as cls
    return cls(index.files, index.labels, views, batch_size=batch, shard=ShardSpec(), train=True, seed=0,
               num_threads=threads, device=device, mean=MEAN, std=STD, **extra)


def images_per_second(loader, device: torch.device, warmup: int, min_batches: int) -> float:
    """Delivered images/s on ``device``, over whole passes until ``min_batches`` timed batches."""
    count, timed, seen, start, epoch = 0, 0, 0, None, 0
    while timed < min_batches:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for item in loader:
            x = item.views["student"] if hasattr(item, "views") else item[0]
            x = x.to(device, non_blocking=True)
            seen += 1
            if seen == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                continue
            if start is not None:
                count += x.shape[0]
                timed += 1
                if timed >= min_batches:
                    break
        epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--size", default="375x500", help="HxW of the generated JPEGs")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1), help="DALI threads / DataLoader workers")
    p.add_argument("--read-ahead", type=int, default=None,
                   help="dali: batches read ahead on a background thread (default: the loader's; 0: none)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-batches", type=int, default=10)
    p.add_argument("--policies", default="weak,strong")
    p.add_argument("--loaders", default="dali,hpckd-torch,torchvision")
    p.add_argument("--data", default=None, help="folder caching the generated JPEGs")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    data_dir = Path(args.data or Path(tempfile.gettempdir()) / "hpckd-bench")
    root = dataset(data_dir, args.images, args.classes, height, width)
    info = hardware()
    print(f"hardware: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), GPU: {info['gpu'] or 'none'}")
    print(f"versions: torch {info['torch']}, torchvision {info['torchvision']}, DALI {info['dali']}")
    print(f"data: {args.images} JPEGs {height}x{width}, crop {args.crop}, batch {args.batch}, {args.threads} threads/workers,"
          f" device {device}")
    results = []
    for strength in args.policies.split(","):
        row = {"policy": strength}
        for kind in args.loaders.split(","):
            if kind == "torchvision":
                loader = torchvision_loader(root, strength, args.crop, args.batch, args.threads)
            else:
                loader = hpckd_loader(kind, root, strength, args.crop, args.batch, args.threads, device,
                                      args.read_ahead)
            row[kind] = images_per_second(loader, device, args.warmup, args.min_batches)
            del loader
        if "dali" in row and "torchvision" in row:
            row["dali/torchvision"] = row["dali"] / row["torchvision"]
        results.append(row)
    keys = [k for k in results[0] if k != "policy"]
    print(f"\n{'policy':8s}" + "".join(f"{k:>18s}" for k in keys))
    for row in results:
        print(f"{row['policy']:8s}" + "".join(f"{row[k]:17.2f}{'x' if '/' in k else ' '}" for k in keys))
    print("(images/s; the last column is the ratio)")
    report = {"hardware": info, "args": vars(args), "device": str(device), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
