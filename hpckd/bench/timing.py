"""What every benchmark suite shares: timing windows, statistics, peak memory, the machine, and the report.

A measurement is a list of per-step (or per-batch) durations taken after a warm-up. They are split into
``repeats`` contiguous windows; each window gives one images/s sample (images in the window / its time), and a row
reports the median of the samples with their spread (min, max, quartiles). Windows rather than single steps, so a
step that waits on a prefetching loader is averaged with the steps it ran ahead of. A ratio is always the median
of a row over the median of its baseline row, both measured in the same run.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

SCHEMA = 1


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between closest ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(float(v) for v in values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median and spread of the repetitions of one measurement."""
    values = [float(v) for v in samples]
    return {"median": percentile(values, 50), "min": min(values), "max": max(values),
            "q1": percentile(values, 25), "q3": percentile(values, 75), "n": len(values), "samples": values}


def window_rates(durations: Sequence[float], images: Sequence[int] | int, repeats: int) -> list[float]:
    """Images/s of ``repeats`` contiguous windows of the steps (``images`` per step, or one count per step).

    The steps are split as evenly as possible; fewer steps than ``repeats`` give one window per step."""
    counts = [images] * len(durations) if isinstance(images, int) else list(images)
    if len(counts) != len(durations) or not durations:
        raise ValueError(f"need one image count per duration and at least one step (got {len(durations)})")
    windows = max(1, min(repeats, len(durations)))
    bounds = [round(k * len(durations) / windows) for k in range(windows + 1)]
    rates = []
    for a, b in zip(bounds, bounds[1:]):
        seconds = sum(durations[a:b])
        rates.append(sum(counts[a:b]) / seconds if seconds > 0 else float("inf"))
    return rates


def sync(device: torch.device) -> None:
    """Wait for the device, so a timestamp covers the work queued before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], int], *, warmup: int, steps: int, device: torch.device) -> tuple[list[float], list[int]]:
    """Run ``step`` (returning the images it processed) ``warmup`` times untimed, then ``steps`` times timed; the
    device is synchronised at every timestamp, so each duration is that step's full cost."""
    for _ in range(warmup):
        step()
    sync(device)
    durations, counts = [], []
    last = time.perf_counter()
    for _ in range(steps):
        counts.append(int(step()))
        sync(device)
        now = time.perf_counter()
        durations.append(now - last)
        last = now
    return durations, counts


class StepClock:
    """A training-loop hook (``hpckd.train.engine.run(cfg, mode, hooks=[clock])``): a timestamp before every
    micro-step. The interval between two timestamps of the same epoch is one step of the real loop as it runs
    (loader wait, batch ops, teachers, student, optimizer, the loop's own checks); intervals across an epoch end
    (evaluation, checkpoint) are dropped."""

    def __init__(self) -> None:
        self.stamps: list[tuple[int, float]] = []

    def __call__(self, context) -> None:
        self.tick(int(context.epoch))

    def tick(self, epoch: int) -> None:
        """The same timestamp, taken by a bare loop (the baselines) that has no StepContext."""
        self.stamps.append((epoch, time.perf_counter()))

    def durations(self, warmup: int) -> list[float]:
        """Step durations within epochs, after the first ``warmup`` steps of the run."""
        out = [b[1] - a[1] for a, b in zip(self.stamps, self.stamps[1:]) if a[0] == b[0]]
        return out[warmup:]


@dataclass
class Memory:
    """Peak memory while a row is measured: the GPU's allocator peak, and this process's peak resident set
    (Linux: VmHWM, reset per row through /proc/self/clear_refs; elsewhere the process-lifetime ru_maxrss)."""

    device: torch.device
    resettable: bool = field(default=False, init=False)

    def __enter__(self) -> "Memory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.resettable = True
        except OSError:
            self.resettable = False
        return self

    def __exit__(self, *exc) -> None:
        return None

    def peaks(self) -> dict[str, float | None]:
        gpu = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        return {"peak_host_rss_mib": host_peak_rss_mib(), "peak_gpu_mib": gpu}


def host_peak_rss_mib() -> float:
    """This process's peak resident set in MiB (VmHWM where /proc has it, else getrusage's ru_maxrss in KiB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def hardware(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable_cores(),
                            "torch_threads": torch.get_num_threads(), "gpu": None, "gpu_count": 0,
                            "gpu_memory_gib": None, "device": str(device), "platform": platform.platform(),
                            "load_average_start": load_average()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=props.total_memory / 2**30)
    return info


def versions() -> dict[str, str | None]:
    import numpy
    import torchvision

    found: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                    "torchvision": torchvision.__version__, "numpy": numpy.__version__,
                                    "cuda": torch.version.cuda, "dali": None}
    try:
        import nvidia.dali as dali

        found["dali"] = dali.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        found["hpckd"] = version("hpckd")
    except Exception:  # a checkout run without installing
        found["hpckd"] = None
    return found


def row(name: str, rates: Sequence[float], *, baseline: str, memory: dict[str, float | None] | None = None,
        **extra: Any) -> dict[str, Any]:
    """One result row: images/s statistics, the name of its baseline row, peak memory and suite-specific fields."""
    return {"name": name, "baseline": baseline, "images_per_s": summarize(rates), "ratio": None,
            **(memory or {"peak_host_rss_mib": None, "peak_gpu_mib": None}), **extra}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """ratio = median images/s of the row / median images/s of its baseline row (same run)."""
    medians = {r["name"]: r["images_per_s"]["median"] for r in rows}
    for r in rows:
        r["ratio"] = medians[r["name"]] / medians[r["baseline"]]


def markdown(report: dict[str, Any]) -> str:
    """bench.md: the machine, then one table per suite."""
    hw, ver = report["hardware"], report["versions"]
    gpus = f" x{hw['gpu_count']}" if hw["gpu_count"] > 1 else ""
    lines = [f"# hpckd bench ({report['size']}, device {report['device']})", "",
             f"- machine: {hw['cpu']}, {hw['cores']} cores ({hw['usable_cores']} usable), GPU: {hw['gpu'] or 'none'}{gpus}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v),
             f"- load average (1 min) at start {hw['load_average_start']:.2f}, at end {report['load_average_end']:.2f};"
             f" wall {report['wall_s']:.0f} s", "",
             "Images/s: median of the timed windows after warm-up (min-max in brackets); ratio = median / the "
             "baseline row's median, same run. Peak host RSS is this process's (loader workers not included).", ""]
    for name, suite in report["suites"].items():
        lines += [f"## {name}", "", suite.get("what", ""), ""]
        lines += ["| row | images/s | min-max | ratio | baseline | peak host MiB | peak GPU MiB | note |",
                  "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
        for r in suite["rows"]:
            s = r["images_per_s"]
            gpu = "-" if r.get("peak_gpu_mib") is None else f"{r['peak_gpu_mib']:.0f}"
            host = "-" if r.get("peak_host_rss_mib") is None else f"{r['peak_host_rss_mib']:.0f}"
            lines.append(f"| {r['name']} | {s['median']:.1f} | {s['min']:.1f}-{s['max']:.1f} | {r['ratio']:.2f}x | "
                         f"{r['baseline']} | {host} | {gpu} | {r.get('note', '')} |")
        for key, value in suite.get("summary", {}).items():
            lines.append(f"\n{key}: {value:.4g}" if isinstance(value, float) else f"\n{key}: {value}")
        lines.append("")
        lines.append("setup: " + ", ".join(f"{k}={v}" for k, v in suite.get("setup", {}).items()))
        lines.append("")
    return "\n".join(lines) + "\n"
