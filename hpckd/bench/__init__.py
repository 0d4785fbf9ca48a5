"""``hpckd bench``: throughput suites, each with its baseline measured in the same run.

``run_suites(names, size, device, out_dir)`` runs the named suites (all when empty) at a size (``tiny``: every
suite in a minute or two on 2 CPU cores, for CI; ``small``: CPU numbers worth reading; ``full``: a GPU node at
224 px, ResNet-50 -> ResNet-18) and writes ``out_dir/bench.json`` and ``out_dir/bench.md``. Generated data,
teachers and runs live in ``out_dir/work`` (data is reused by a later run into the same folder).
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from hpckd.bench import timing
from hpckd.bench.common import Context
from hpckd.errors import UserError
from hpckd.io import atomic_write_json, atomic_write_text

# suite name -> module of hpckd.bench with ``run(ctx) -> dict``; the order is the report's.
SUITES = {"loaders": "loaders", "teachers": "teachers", "kd-step": "kd_step", "overhead": "overhead",
          "end-to-end": "end_to_end", "scaling": "scaling"}
SIZES = ("tiny", "small", "full")
DEVICES = ("auto", "cpu", "cuda")


class BenchError(UserError):
    """A bench argument a user can fix (unknown suite, size or device)."""


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise BenchError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA GPU is visible to torch")
    return torch.device("cuda", 0) if device != "cpu" and torch.cuda.is_available() else torch.device("cpu")


def run_suites(names: Sequence[str], size: str, device: str, out_dir: str | Path,
               work_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the suites ``names`` (every suite when empty) and write bench.json + bench.md into ``out_dir``;
    generated data, teachers and runs go to ``work_dir`` (default ``out_dir/work``; data found there is reused)."""
    names = list(names) or list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise BenchError(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    if size not in SIZES:
        raise BenchError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    dev = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        # Half the cores compute, the rest feed data (loader workers, DALI threads). On a shared 2-core machine two
        # spinning OpenMP threads that lose their core to another job made steps up to 20x slower than one thread.
        torch.set_num_threads(max(1, timing.usable_cores() // 2))
    try:
        return _run(names, size, dev, out, Path(work_dir) if work_dir else out / "work")
    finally:
        torch.set_num_threads(threads)


def _run(names: list[str], size: str, dev: torch.device, out: Path, work: Path) -> dict[str, Any]:
    ctx = Context(size=size, device=dev, out_dir=out, work=work)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"schema": timing.SCHEMA, "size": size, "device": str(dev),
                              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "hardware": timing.hardware(dev), "versions": timing.versions(), "suites": {}}
    for name in dict.fromkeys(names):  # once each, in the order given
        ctx.log(f"suite {name} ({size}, {dev})")
        t_suite = time.perf_counter()
        module = importlib.import_module(f"hpckd.bench.{SUITES[name]}")
        suite = module.run(ctx)
        timing.add_ratios(suite["rows"])
        suite["wall_s"] = time.perf_counter() - t_suite
        report["suites"][name] = suite
    report["wall_s"] = time.perf_counter() - t0
    report["load_average_end"] = timing.load_average()
    atomic_write_json(out / "bench.json", report)
    atomic_write_text(out / "bench.md", timing.markdown(report))
    return report
