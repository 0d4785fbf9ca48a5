"""One rank of the scaling suite, started by torchrun: ``python -m hpckd.bench.scaling_worker OUT OVERRIDES_JSON``.

Runs :func:`hpckd.train.engine.run` (mode ``train``) with a step clock; rank 0 writes the clock's timestamps, its
peak memory and the run's timings to OUT (temp file then rename)."""

from __future__ import annotations

import json
import os
import sys

import torch

from hpckd import dist
from hpckd.bench import timing
from hpckd.bench.common import train_run
from hpckd.io import atomic_write_json


def main(argv: list[str]) -> int:
    out, overrides = argv[0], json.loads(argv[1])
    clock = timing.StepClock()
    on_gpu = torch.cuda.is_available() and "dist.device=cpu" not in overrides
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else torch.device("cpu")
    with timing.Memory(device) as mem:
        results = train_run(overrides, "train", hooks=[clock])
        peaks = mem.peaks()
    if dist.info().is_main:
        atomic_write_json(out, {"stamps": clock.stamps, **peaks, "timings": results["timings"],
                                "world_size": results["world_size"]})
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
