"""Scaling: student training with DDP over 1, 2, 4, ... processes (one per GPU present; on CPU 1 vs 2 gloo
processes), the per-process batch fixed (weak scaling), each run through :func:`hpckd.train.engine.run` under
torchrun. Images/s are global (all ranks); the baseline is 1 process; efficiency = ratio / processes. On CPU the
processes run one compute thread each, so on 2 cores 2 processes use twice the cores of 1: the ratio below 2 is
what the gradient all-reduce (gloo) and the second process cost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hpckd.bench import timing
from hpckd.bench.common import FULL_DATA, Context, common_overrides, dataset, has_dali
from hpckd.errors import UserError

SIZES = {
    "tiny": dict(classes=4, per_class=32, height=16, width=16, family="cifar", image=16, arch="resnet8", batch=8,
                 epochs=1, workers=0, warmup=2, repeats=3),
    "small": dict(classes=10, per_class=64, height=32, width=32, family="cifar", image=32, arch="resnet8", batch=32,
                  epochs=1, workers=1, warmup=3, repeats=4),
    "full": dict(**FULL_DATA, family="imagenet", image=224, arch="resnet18",
                 batch=128, epochs=4, workers=4, warmup=3, repeats=5),
}
WORKER = "hpckd.bench.scaling_worker"


def process_counts(ctx: Context) -> list[int]:
    """1, 2, 4, ... up to the GPUs present (and their count); 1 and 2 on CPU."""
    if not ctx.cuda:
        return [1, 2]
    import torch

    gpus = torch.cuda.device_count()
    counts = [n for n in (1, 2, 4, 8, 16, 32) if n <= gpus]
    return counts + ([gpus] if gpus not in counts else [])


def launch(n: int, overrides: list[str], out: Path, threads: int, timeout: float = 1800) -> dict[str, Any]:
    """torchrun with ``n`` processes of the worker; returns rank 0's step timestamps and results."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", WORKER,
           str(out), json.dumps(overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"bench scaling: {n} process(es) failed (exit {proc.returncode}): {tail}")
    return json.loads(out.read_text())


def run(ctx: Context) -> dict[str, Any]:
    s = ctx.pick(SIZES)
    root = dataset(ctx, s["classes"], s["per_class"], s["height"], s["width"])
    loader = "dali" if ctx.cuda and has_dali() else "torch"
    rows = []
    for n in process_counts(ctx):
        overrides = [*common_overrides(root, family=s["family"], image_size=s["image"], batch=s["batch"] * n,
                                       workers=s["workers"], loader=loader, device=ctx.device),
                     f"model.arch={s['arch']}", f"optim.epochs={s['epochs']}", f"dist.nproc_per_node={n}",
                     f"out_dir={ctx.work}/scaling/n{n}"]
        # One compute thread per process on CPU (n processes use n cores, as n GPUs would); on GPUs a share of the
        # cores for each rank's loader.
        threads = 1 if not ctx.cuda else max(1, timing.usable_cores() // (2 * n))
        result = launch(n, overrides, ctx.work / "scaling" / f"n{n}.json", threads)
        clock = timing.StepClock()
        clock.stamps = [tuple(x) for x in result["stamps"]]
        durations = clock.durations(s["warmup"])
        rates = timing.window_rates(durations, s["batch"] * n, s["repeats"])
        rows.append(timing.row(f"{n} process(es)", rates, baseline="1 process(es)", steps_timed=len(durations),
                               processes=n, peak_host_rss_mib=result["peak_host_rss_mib"],
                               peak_gpu_mib=result["peak_gpu_mib"], threads_per_process=threads))
    base = rows[0]["images_per_s"]["median"]
    for r in rows:  # weak scaling: global images/s over (processes x one process's)
        r["efficiency"] = r["images_per_s"]["median"] / base / r["processes"]
    return {"what": __doc__.replace("\n", " "), "setup": {**s, "loader": loader, "batch_per_process": s["batch"]},
            "rows": rows}
