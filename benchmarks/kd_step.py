"""KD step throughput of the real training loop, and what a logit store saves.

Runs :func:`hpckd.train.engine.run` on a small generated data set, in one process, for

* student-only (``hpckd train`` of the student: cross-entropy, no teacher),
* inline 1 teacher, inline 2 teachers (``serving.mode=inline``: teacher forwards every step),
* cached 2 teachers (``serving.mode=cached``: the same teachers read from a logit store written first),

and prints images/s of the training loop (``results.json`` ``timings.train_images_per_s``: loader, batch ops, teachers,
student forward/backward, optimizer) and the ratio to student-only, with the hardware. Then the size of a store per
ImageNet epoch (1,281,167 images, 1000 classes) for fp16 full logits and top-k.

Usage::

    python benchmarks/kd_step.py [--work DIR] [--student resnet8] [--teacher resnet32] [--epochs 2]
        [--batch 64] [--images-per-class 64] [--classes 10] [--loader torch|dali] [--workers 2]

Not a test: numbers depend on the machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hpckd.data.synth import SynthSpec, write_imagefolder  # noqa: E402
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py, next to this script)
from hpckd.teachers.store import ROW_BYTES, bytes_per_row, human  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def hardware() -> str:
    cpu = cpu_model()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"CPU {cpu}, {os.cpu_count()} logical cores (torch threads {torch.get_num_threads()}), GPU {gpu}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def config(overrides: list[str]):
    from hpckd.train.experiment import load_experiment

    return load_experiment(None, overrides)


def run(overrides: list[str], mode: str) -> dict:
    from hpckd.train.engine import run as train

    return train(config(overrides), mode=mode)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=None, help="folder for data, teachers, store, runs (default: a temp folder)")
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--teacher", default="resnet32")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--images-per-class", type=int, default=64)
    ap.add_argument("--loader", default="torch", choices=["torch", "dali"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting, interleaved; the fastest counts")
    args = ap.parse_args(argv)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hpckd-kdbench-"))
    data = work / "data"
    write_imagefolder(data, SynthSpec(classes=args.classes, per_class=args.images_per_class, val_per_class=4, seed=0))
    common = [f"data.root={data}", f"data.batch_size={args.batch}", f"data.eval_batch_size={args.batch}",
              f"data.num_workers={args.workers}", f"data.loader={args.loader}", "log_every=0",
              "metrics.attention_iou=false", "resume=never"]
    print(f"hardware: {hardware()}")
    print(f"data: {args.classes} classes x {args.images_per_class} images of 32 px, global batch {args.batch}, "
          f"{args.loader} loader, {args.epochs} epoch(s) per setting; student {args.student}, teachers "
          f"{args.teacher}")

    teachers = []
    for seed in (0, 1):
        out = work / f"teacher{seed}"
        if (out / "last.pt").exists():  # a --work folder of an earlier benchmark: same teachers
            teachers.append(out / "last.pt")
            continue
        run([*common, f"out_dir={out}", f"model.arch={args.teacher}", "optim.epochs=1", f"seed={seed}"], "train")
        teachers.append(out / "last.pt")
    one = f"teachers=[{{checkpoint: {teachers[0]}}}]"
    two = f"teachers=[{{checkpoint: {teachers[0]}}}, {{checkpoint: {teachers[1]}}}]"
    student = [*common, f"model.arch={args.student}", f"optim.epochs={args.epochs}", "loss.name=kd"]

    store = work / "store"
    if store.exists():
        shutil.rmtree(store)
    from hpckd.teachers.store_writer import cache

    t0 = time.perf_counter()
    cache(config([*student, two, f"out_dir={work}/unused"]), epochs=args.epochs, out=str(store), log=print)
    write_s = time.perf_counter() - t0

    settings = {
        "student-only": ([*student, f"out_dir={work}/student"], "train"),
        "inline 1 teacher": ([*student, one, f"out_dir={work}/inline1"], "distill"),
        "inline 2 teachers": ([*student, two, f"out_dir={work}/inline2"], "distill"),
        "cached 2 teachers": ([*student, two, "serving.mode=cached", f"serving.store={store}",
                               f"out_dir={work}/cached2"], "distill"),
    }
    run(*settings["student-only"])  # warm-up (first DataLoader workers, allocator, kernels), not counted
    rates: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved, so a burst of load elsewhere hits every setting alike
        for name, (overrides, mode) in settings.items():
            rate = run(overrides, mode)["timings"]["train_images_per_s"]
            rates[name] = max(rates.get(name, 0.0), rate)
    base = rates["student-only"]
    print()
    print(f"{'setting':<20} {'images/s':>10} {'x student-only':>15}   (best of {args.repeats}, interleaved)")
    for name, rate in rates.items():
        print(f"{name:<20} {rate:>10.1f} {rate / base:>15.2f}")
    print(f"(writing the 2-teacher store for {args.epochs} epoch(s) took {write_s:.1f} s, paid once per sweep)")

    print()
    print(f"logit store size per ImageNet epoch ({IMAGENET_TRAIN:,} images, 1000 classes, one view, per teacher; "
          f"x2 for a doubled batch):")
    for k in (0, 5, 10, 20, 50, 100):
        per = IMAGENET_TRAIN * (ROW_BYTES + bytes_per_row(1000, k))
        label = "fp16 full logits" if k == 0 else f"top-{k}"
        print(f"  {label:<18} {human(per):>10} per epoch  ({bytes_per_row(1000, k)} B/row + {ROW_BYTES} B ids)")
    print(json.dumps({"hardware": hardware(), "images_per_s": rates, "store_write_s": write_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
