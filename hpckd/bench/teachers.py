"""Teacher inference images/s: fp32 (the baseline), bf16 autocast + channels-last (hpckd's serving default on a
GPU), and ``torch.compile`` (fp32; on CPU at size tiny the ``aot_eager`` backend, since inductor's C++ build of
even a small net takes about a minute on 2 cores). Frozen weights, ``no_grad``, a fixed batch on the device."""

from __future__ import annotations

from typing import Any

import torch

from hpckd.bench import timing
from hpckd.bench.common import Context
from hpckd.models import create
from hpckd.precision import autocast

SIZES = {
    "tiny": dict(arch="resnet20", classes=10, image=32, batch=16, warmup=2, steps=9, repeats=3),
    "small": dict(arch="resnet32", classes=100, image=32, batch=64, warmup=3, steps=20, repeats=4),
    "full": dict(arch="resnet50", classes=1000, image=224, batch=256, warmup=10, steps=40, repeats=5),
}


def _model(arch: str, classes: int, device: torch.device, channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create(arch, classes).to(device).eval().requires_grad_(False)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _forward(model: torch.nn.Module, inputs: torch.Tensor, precision: str, device: torch.device):
    def step() -> int:
        with torch.no_grad(), autocast(precision, device):
            model(inputs)
        return inputs.shape[0]

    return step


def run(ctx: Context) -> dict[str, Any]:
    s = ctx.pick(SIZES)
    x = torch.randn(s["batch"], 3, s["image"], s["image"], device=ctx.device)
    backend = "aot_eager" if (ctx.size == "tiny" and not ctx.cuda) else "inductor"
    configs = [("fp32", "fp32", False, None), ("bf16+channels-last", "bf16", True, None),
               (f"compiled fp32 ({backend})", "fp32", False, backend)]
    rows = []
    for name, precision, channels_last, compile_backend in configs:
        with timing.Memory(ctx.device) as mem:
            model = _model(s["arch"], s["classes"], ctx.device, channels_last)
            if compile_backend:
                model = torch.compile(model, backend=compile_backend)
            inputs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            d, c = timing.time_steps(_forward(model, inputs, precision, ctx.device), warmup=s["warmup"],
                                     steps=s["steps"], device=ctx.device)
            rows.append(timing.row(name, timing.window_rates(d, c, s["repeats"]), baseline="fp32", memory=mem.peaks(),
                                   note="compile time excluded (warm-up)" if compile_backend else ""))
    return {"what": __doc__.replace("\n", " "), "setup": s, "rows": rows}
