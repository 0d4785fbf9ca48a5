"""KD step throughput of the real training loop (:func:`hpckd.train.engine.run`, not a copy of it) on a generated
set: student-only (the baseline, cross-entropy), inline 1 teacher, inline 2 teachers (teacher forwards every step)
and cached 2 teachers (the same teachers read from a logit store written first by
:func:`hpckd.teachers.store_writer.cache`). Step times come from a hook the loop calls before every micro-step
(:class:`hpckd.bench.timing.StepClock`): loader wait, batch ops, teachers, student, optimizer and the loop's checks;
the epoch ends (evaluation, checkpoint) are not counted."""

from __future__ import annotations

import shutil
import time
from typing import Any

from hpckd.bench import timing
from hpckd.bench.common import FULL_DATA, Context, common_overrides, dataset, experiment, has_dali, teacher_checkpoint, train_run

SIZES = {
    "tiny": dict(classes=4, per_class=32, height=16, width=16, family="cifar", image=16, student="resnet8",
                 teacher="resnet8", batch=16, epochs=1, workers=0, warmup=1, repeats=3, rounds=1),
    "small": dict(classes=10, per_class=64, height=32, width=32, family="cifar", image=32, student="resnet8",
                  teacher="resnet32", batch=64, epochs=2, workers=2, warmup=3, repeats=2, rounds=2),
    "full": dict(**FULL_DATA, family="imagenet", image=224, student="resnet18",
                 teacher="resnet50", batch=256, epochs=2, workers=16, warmup=5, repeats=4, rounds=1),
}


def run(ctx: Context) -> dict[str, Any]:
    s = ctx.pick(SIZES)
    root = dataset(ctx, s["classes"], s["per_class"], s["height"], s["width"])
    loader = "dali" if ctx.cuda and has_dali() else "torch"
    common = common_overrides(root, family=s["family"], image_size=s["image"], batch=s["batch"],
                              workers=s["workers"], loader=loader, device=ctx.device)
    teachers = [teacher_checkpoint(ctx, common, s["teacher"], seed) for seed in (0, 1)]
    one = f"teachers=[{{checkpoint: {teachers[0]}}}]"
    two = f"teachers=[{{checkpoint: {teachers[0]}}}, {{checkpoint: {teachers[1]}}}]"
    runs = ctx.work / "kd-step"
    student = [*common, f"model.arch={s['student']}", f"optim.epochs={s['epochs']}", "loss.name=kd"]
    store = runs / "store"
    if store.exists():
        shutil.rmtree(store)
    from hpckd.teachers.store_writer import cache

    t0 = time.perf_counter()
    cache(experiment([*student, two, f"out_dir={runs}/store-cfg"]), epochs=s["epochs"], out=str(store),
          log=lambda message: None)
    store_s = time.perf_counter() - t0
    settings = [
        ("student-only", [*student, f"out_dir={runs}/student"], "train"),
        ("inline 1 teacher", [*student, one, f"out_dir={runs}/inline1"], "distill"),
        ("inline 2 teachers", [*student, two, f"out_dir={runs}/inline2"], "distill"),
        ("cached 2 teachers", [*student, two, "serving.mode=cached", f"serving.store={store}",
                               f"out_dir={runs}/cached2"], "distill"),
    ]
    # The first run of the loop in a process is up to 1.5x slower per step (CPU kernels and allocator caches are
    # built for the shapes it meets): an untimed student-only epoch first, so the baseline row does not pay it.
    train_run([*student, "optim.epochs=1", f"out_dir={runs}/warm-up"], "train")
    rates: dict[str, list[float]] = {name: [] for name, _, _ in settings}
    run_rates: dict[str, list[float]] = {name: [] for name, _, _ in settings}
    steps: dict[str, int] = {name: 0 for name, _, _ in settings}
    peaks: dict[str, dict] = {}
    # Rounds run every setting in turn, so a load change on a shared machine hits all settings alike.
    for _ in range(s["rounds"]):
        for name, overrides, mode in settings:
            clock = timing.StepClock()
            with timing.Memory(ctx.device) as mem:
                results = train_run(overrides, mode, hooks=[clock])
            durations = clock.durations(s["warmup"])
            rates[name] += timing.window_rates(durations, s["batch"], s["repeats"])
            run_rates[name].append(results["timings"]["train_images_per_s"])
            steps[name] += len(durations)
            peaks[name] = {k: max(filter(None, [v, peaks.get(name, {}).get(k)]), default=None)
                           for k, v in mem.peaks().items()}
    rows = [timing.row(name, rates[name], baseline="student-only", memory=peaks[name], steps_timed=steps[name],
                       run_images_per_s=run_rates[name]) for name in rates]
    setup = {**s, "loader": loader, "images": s["classes"] * s["per_class"], "store_write_s": round(store_s, 2)}
    return {"what": __doc__.replace("\n", " "), "setup": setup, "rows": rows,
            "summary": {"logit store write (2 teachers, all epochs), s": store_s}}
