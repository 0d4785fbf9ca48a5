"""Student training throughput of hpckd's backends: DDP vs DeepSpeed, fp32 vs bf16, channels-last on/off.

Every configuration runs the real training step of :mod:`hpckd.train.backends` (forward under the configured
autocast, the loss, backward, optimizer and scheduler step) on a fixed in-memory batch, so the numbers isolate
the backend and the numerics from data loading. Optionally a frozen teacher runs inline and the loss is KD. All
configurations live in one process (or one process group); after a warm-up they are timed round-robin in several
windows, so a load change on a shared machine hits all of them alike, and each is reported as the median images/s
and as the ratio to the baseline (DDP, fp32, NCHW) measured in the same run, with the hardware printed first.

    # CPU smoke run (tiny CIFAR net)
    python benchmarks/train.py --arch resnet8 --image-size 32 --batch-size 32 --steps 10
    # One GPU, the ImageNet students
    python benchmarks/train.py --arch resnet18,resnet50 --image-size 224 --batch-size 128 --steps 50
    # Several GPUs: the same script under a launcher (batch size is per process)
    torchrun --nproc_per_node 8 benchmarks/train.py --arch resnet50 --image-size 224 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from hpckd import dist  # noqa: E402
from hpckd.train.experiment import load_experiment  # noqa: E402
from hpckd.data.batch import Batch  # noqa: E402
from hpckd.losses import LossConfig, build_loss  # noqa: E402
from hpckd.models import create  # noqa: E402
from hpckd.train.backends import build_backend, prepare_model  # noqa: E402
from hpckd.precision import PrecisionPolicy, autocast  # noqa: E402
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py, next to this script)

# (name, backend, precision, channels_last); the first is the baseline of the ratios.
CONFIGS = [
    ("ddp-fp32", "ddp", "fp32", False),
    ("ddp-bf16", "ddp", "bf16", False),
    ("ddp-fp32-cl", "ddp", "fp32", True),
    ("ddp-bf16-cl", "ddp", "bf16", True),
    ("deepspeed-fp32", "deepspeed", "fp32", False),
    ("deepspeed-bf16", "deepspeed", "bf16", False),
    ("deepspeed-bf16-cl", "deepspeed", "bf16", True),
]


@dataclass
class Result:
    arch: str
    config: str
    images_per_s: float | None
    ratio: float | None
    step_ms: float | None
    peak_gpu_gib: float | None
    note: str = ""


def hardware(device: torch.device) -> dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": cpu_model(), "cpu_count": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
            "device": str(device), "world_size": str(dist.info().world_size)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        info["cuda"] = str(torch.version.cuda)
    try:
        from importlib.metadata import version

        info["deepspeed"] = version("deepspeed")
    except Exception:  # not installed: the DeepSpeed rows say so
        info["deepspeed"] = "not installed"
    return info


def experiment_config(args, backend: str, precision: str, channels_last: bool, world: int):
    return load_experiment(None, [
        f"dist.backend={backend}", f"dist.zero_stage={args.zero_stage}", f"train.precision={precision}",
        f"train.channels_last={str(channels_last).lower()}", f"data.batch_size={args.batch_size * world}",
        "optim.name=sgd", "optim.lr=0.01", "optim.schedule=constant", f"dist.device={args.device}",
    ])


class Bench:
    """One configuration, built once: ``step()`` runs one training step on a fixed batch."""

    def __init__(self, args, arch: str, name: str, backend_name: str, precision: str, channels_last: bool) -> None:
        info = dist.info()
        self.arch, self.name, self.device, self.world = arch, name, info.device, info.world_size
        cfg = experiment_config(args, backend_name, precision, channels_last, info.world_size)
        torch.manual_seed(0)
        model = prepare_model(create(arch, args.classes), cfg, self.device)
        self.backend = build_backend(cfg, model, info, 10**6, PrecisionPolicy.from_config(cfg, self.device))
        self.teacher = None
        if args.teacher:
            self.teacher = create(args.teacher, args.classes).to(self.device).eval().requires_grad_(False)
            if channels_last:
                self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(LossConfig(name="kd", tau=4.0) if self.teacher is not None else LossConfig(name="ce"))
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=self.device)
        self.x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        y = torch.randint(0, args.classes, (args.batch_size,), device=self.device)
        self.batch = Batch(views={"student": self.x}, labels=y, index=torch.arange(args.batch_size, device=self.device))
        self.precision, self.batch_size = precision, args.batch_size
        self.rates: list[float] = []
        self.peak_gib: float | None = None

    def step(self) -> None:
        with self.backend.no_sync(True):
            with autocast(self.precision, self.device), torch.no_grad():
                teacher_logits = [self.teacher(self.x).float()] if self.teacher is not None else []
            logits = self.backend.forward(self.x).float()
            self.backend.backward(self.loss_fn(logits, teacher_logits, self.batch)["loss"], True)
        self.backend.step()

    def timed(self, steps: int) -> None:
        """One timed window of ``steps`` steps; appends its images/s (global) and tracks peak GPU memory."""
        self.backend.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        _sync(self.device)
        self.rates.append(steps * self.batch_size * self.world / (time.perf_counter() - t0))
        if self.device.type == "cuda":
            self.peak_gib = max(self.peak_gib or 0.0, torch.cuda.max_memory_allocated(self.device) / 2**30)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def run(args) -> list[Result]:
    """Per architecture: build every configuration, warm each up, then time them round-robin ``repeats`` times
    (a load change on a shared machine then hits all configurations alike) and report medians."""
    results: list[Result] = []
    wanted = [c for c in CONFIGS if not args.configs or c[0] in args.configs]
    for arch in args.arch:
        benches: list[Bench | Result] = []
        for name, backend, precision, channels_last in wanted:
            try:
                bench = Bench(args, arch, name, backend, precision, channels_last)
                for _ in range(args.warmup):
                    bench.step()
                benches.append(bench)
            except Exception as exc:  # e.g. DeepSpeed missing, bf16 unsupported: report the row, keep going
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                benches.append(Result(arch, name, None, None, None, None, note=f"failed: {type(exc).__name__}: {first}"[:160]))
        for _ in range(args.repeats):
            for bench in benches:
                if isinstance(bench, Bench):
                    bench.timed(args.steps)
        rows = [b if isinstance(b, Result) else _row(b) for b in benches]
        base = rows[0].images_per_s if rows and rows[0].images_per_s else None
        for row in rows:
            if base and row.images_per_s:
                row.ratio = row.images_per_s / base
        results += rows
        del benches
    return results


def _row(bench: Bench) -> Result:
    rate = statistics.median(bench.rates)
    spread = f"min {min(bench.rates):.1f} max {max(bench.rates):.1f}" if len(bench.rates) > 1 else ""
    step_ms = 1000 * bench.batch_size * bench.world / rate
    return Result(bench.arch, bench.name, rate, None, step_ms, bench.peak_gib, note=spread)


def format_table(results: list[Result]) -> str:
    lines = [f"{'arch':<10} {'config':<19} {'images/s':>10} {'ratio':>7} {'ms/step':>9} {'peak GiB':>9}  note",
             "-" * 78]
    for r in results:
        ips = f"{r.images_per_s:.1f}" if r.images_per_s else "-"
        ratio = f"{r.ratio:.2f}x" if r.ratio else "-"
        ms = f"{r.step_ms:.1f}" if r.step_ms else "-"
        peak = f"{r.peak_gpu_gib:.2f}" if r.peak_gpu_gib is not None else "-"
        lines.append(f"{r.arch:<10} {r.config:<19} {ips:>10} {ratio:>7} {ms:>9} {peak:>9}  {r.note}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18,resnet50", help="comma-separated model names")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--teacher", default="", help="inline frozen teacher (KD loss), e.g. resnet50; default: CE only")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per configuration (round-robin; median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (cudnn autotuning, allocator, JIT)")
    p.add_argument("--zero-stage", type=int, default=1, help="ZeRO stage of the DeepSpeed rows")
    p.add_argument("--configs", default="", help="comma-separated subset of: " + ", ".join(c[0] for c in CONFIGS))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", default="", help="also write the results (and hardware) to this JSON file")
    args = p.parse_args(argv)
    args.arch = [a for a in args.arch.split(",") if a]
    args.configs = [c for c in args.configs.split(",") if c]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    info = dist.init(args.device)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    hw = hardware(info.device)
    results = run(args)
    if info.is_main:
        print("hardware: " + ", ".join(f"{k}={v}" for k, v in hw.items()))
        print(f"setup: batch {args.batch_size}/process x {info.world_size}, {args.image_size}px, {args.classes} classes, "
              f"median of {args.repeats} round-robin windows of {args.steps} steps after {args.warmup} warm-up, ZeRO {args.zero_stage}, "
              f"loss {'KD from ' + args.teacher if args.teacher else 'CE'}; ratio = images/s / {CONFIGS[0][0]}")
        print(format_table(results))
        if args.json:
            Path(args.json).write_text(json.dumps({"hardware": hw, "args": vars(args),
                                                   "results": [asdict(r) for r in results]}, indent=2) + "\n")
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
