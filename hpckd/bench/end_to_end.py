"""End-to-end: one epoch of distillation (loader + strong augmentation + teacher + student + optimizer) on generated
ImageNet-like JPEGs. hpckd: :func:`hpckd.train.engine.run` with its defaults (DALI loader when installed, teacher
served in bf16 + channels-last on a GPU). Baseline, the studies' code style: PIL ``ImageFolder`` + torchvision
transforms (RandomResizedCrop, flip, colour jitter, RandAugment) in a ``DataLoader`` with workers, fp32, the
teacher run in fp32 on every batch, a plain loop with the KD loss (CE + tau^2 KL, Hinton et al. eq. 2)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from hpckd.bench import timing
from hpckd.bench.common import FULL_DATA, Context, common_overrides, dataset, has_dali, teacher_checkpoint, train_run
from hpckd.bench.loaders import torchvision_loader
from hpckd.models import create

SIZES = {
    "tiny": dict(classes=4, per_class=32, height=40, width=48, image=24, student="resnet8", teacher="resnet8",
                 batch=16, workers=1, warmup=1, repeats=3),
    "small": dict(classes=8, per_class=32, height=375, width=500, image=96, student="resnet8", teacher="resnet20",
                  batch=16, workers=2, warmup=2, repeats=4),
    "full": dict(**FULL_DATA, image=224, student="resnet18", teacher="resnet50",
                 batch=128, workers=16, warmup=3, repeats=5),
}
TAU = 4.0


def studies_loop(ctx: Context, s: dict[str, Any], root, clock: timing.StepClock, max_batches: int | None = None) -> None:
    """The baseline: the plain loop the studies' code runs (fp32 throughout); ``max_batches`` stops early."""
    device = ctx.device
    loader = torchvision_loader(root / "train", "strong", s["image"], s["batch"], s["workers"], ctx.cuda)
    torch.manual_seed(0)
    teacher = create(s["teacher"], s["classes"]).to(device).eval().requires_grad_(False)
    student = create(s["student"], s["classes"]).to(device).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for k, (x, y) in enumerate(loader):
        if max_batches is not None and k == max_batches:
            break
        clock.tick(0)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad():
            t = teacher(x)
        logits = student(x)
        kd = F.kl_div(F.log_softmax(logits / TAU, 1), F.softmax(t / TAU, 1), reduction="batchmean") * TAU**2
        loss = F.cross_entropy(logits, y) + kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    timing.sync(device)



def run(ctx: Context) -> dict[str, Any]:
    s = ctx.pick(SIZES)
    root = dataset(ctx, s["classes"], s["per_class"], s["height"], s["width"])
    loader = "dali" if has_dali() else "torch"
    common = common_overrides(root, family="imagenet", image_size=s["image"], batch=s["batch"], workers=s["workers"],
                              loader=loader, device=ctx.device)
    teacher = teacher_checkpoint(ctx, common, s["teacher"], 0)
    overrides = [*common, "aug=strong", f"model.arch={s['student']}", "optim.epochs=1", "loss.name=kd",
                 f"loss.tau={TAU}", f"teachers=[{{checkpoint: {teacher}}}]", f"out_dir={ctx.work}/end-to-end/hpckd"]
    # Untimed, a few batches: the first training run in a process is slower (kernel and allocator caches are built
    # for the models' shapes), which would otherwise land on the baseline alone.
    studies_loop(ctx, s, root, timing.StepClock(), max_batches=s["warmup"] + 2)
    rows = []
    for name in ("studies' code", "hpckd"):
        clock = timing.StepClock()
        with timing.Memory(ctx.device) as mem:
            if name == "hpckd":
                train_run(overrides, "distill", hooks=[clock])
            else:
                studies_loop(ctx, s, root, clock)
        durations = clock.durations(s["warmup"])
        rows.append(timing.row(name, timing.window_rates(durations, s["batch"], s["repeats"]), baseline="studies' code",
                               memory=mem.peaks(), steps_timed=len(durations),
                               note=f"{loader} loader" if name == "hpckd" else "ImageFolder+v2, fp32"))
    return {"what": __doc__.replace("\n", " "), "setup": {**s, "hpckd_loader": loader}, "rows": rows}
