"""What each ``hpckd`` subcommand does (the parser in :mod:`hpckd.cli.parser` binds them). Heavy modules are imported
inside the commands, so ``hpckd --help`` and a usage error stay fast."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from hpckd.errors import UserError
from hpckd.cli.ranks import relaunch_if_needed

def config_and_overrides(args) -> tuple[str | None, list[str]]:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]  # `hpckd train optim.lr=0.1` without a file
    return config, overrides


def load_config(args) -> "object":
    from hpckd.train.experiment import load_experiment

    return load_experiment(*config_and_overrides(args))


def cmd_run(mode: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        cfg = load_config(args)
        rc = relaunch_if_needed(cfg, args.argv)
        if rc is not None:
            return rc
        from hpckd.train.engine import run

        results = run(cfg, mode=mode)
        from hpckd import dist

        if dist.info().is_main:
            m = results["metrics"]
            extra = f", top-1 agreement {m['top1_agreement']:.3f}" if "top1_agreement" in m else ""
            print(f"{mode}: val accuracy {m['accuracy']:.3f}{extra} -> {os.path.join(cfg.out_dir, 'results.json')}")
        dist.shutdown()
        return 0

    return command


def cmd_eval(args: argparse.Namespace) -> int:
    from hpckd import dist
    from hpckd.train.evaluation import evaluate_checkpoint

    results = evaluate_checkpoint(args.checkpoint, split=args.split, augmented=args.augmented, overrides=args.overrides,
                                  against=args.against or ())
    if dist.info().is_main:
        for key, metrics in results.items():
            shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("accuracy", "nll", "ece", "top1_agreement", "predictive_kl")
                              if k in metrics)
            print(f"eval {key}: {shown} (n={int(metrics['count'])})")
    dist.shutdown()
    return 0


def cmd_efficient(args: argparse.Namespace) -> int:
    from hpckd import dist
    from hpckd.sweep.stages import run_efficient_distillation

    results = run_efficient_distillation(*config_and_overrides(args), args.strong_teacher, args.epochs, args.form)
    if dist.info().is_main:
        for r in results:
            print(f"{r['name']}: val accuracy {r['metrics']['accuracy']:.3f}")
    dist.shutdown()
    return 0


def cmd_tstddev(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    rc = relaunch_if_needed(cfg, args.argv)
    if rc is not None:
        return rc
    from hpckd import dist
    from hpckd.train.protocols import tstddev_pass

    r = tstddev_pass(cfg, epochs=args.epochs, group_size=args.group_size, unbiased=not args.biased, output=args.output)
    if dist.info().is_main:
        print(f"tstddev: T. stddev {r['tstddev']:.6g} over {int(r['tstddev_groups'])} groups of {r['group_size']}, "
              f"v-bar {r['vbar']:.6g}, r-bar {r['rbar']:.6g} -> {r['path']}")
    dist.shutdown()
    return 0


def cmd_ab_test(args: argparse.Namespace) -> int:
    from hpckd.train.protocols import ab_test

    r = ab_test(args.control, args.treatment, args.output, metric=args.metric)
    print(f"ab-test: p-value {r['p_value']:.4g} ({r['treatment_higher']} of {r['trials']} trials higher under the "
          f"treatment, {args.metric}) -> {args.output}")
    return 0


def cmd_normalized_accuracy(args: argparse.Namespace) -> int:
    from hpckd.train.protocols import store_normalized_accuracy

    value = store_normalized_accuracy(args.run, args.weak, args.strong, metric=args.metric)
    print(f"normalized {args.metric}: {value:.4f} -> {args.run}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hpckd.report import summary_table, write_report

    html = write_report(args.dir, args.out)
    print(summary_table(args.dir))
    print(f"report: {html}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from hpckd.bench import run_suites

    report = run_suites(args.suites, args.size, args.device, args.out, args.work)
    print(f"bench ({report['size']}, {report['device']}): {', '.join(report['suites'])} -> {args.out}/bench.json, "
          f"{args.out}/bench.md")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from hpckd.data.synth import SynthSpec, parse_size, write_imagefolder
    from hpckd.io import check_output_dir

    h, w = parse_size(args.size)
    check_output_dir(args.out, "--out")
    counts = write_imagefolder(args.out, SynthSpec(classes=args.classes, per_class=args.per_class,
                                                   val_per_class=args.val_per_class, height=h, width=w, seed=args.seed))
    print(f"wrote {counts['train']} train and {counts['val']} val JPEGs ({args.classes} classes, {h}x{w}) to {args.out}")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from hpckd.data.index import build_index, check_split_folder
    from hpckd.data.wds import write_shards
    from hpckd.io import check_output_dir

    check_output_dir(args.out, "--out")
    check_split_folder(args.src, "--src")
    index = build_index(args.src, args.on_bad_image, cache=None)
    manifest = write_shards(index, args.out, max_count=args.max_count, seed=args.seed)
    print(f"wrote {manifest['count']} samples ({len(index.classes)} classes) in {len(manifest['shards'])} shard(s) "
          f"to {args.out}; skipped {len(index.skipped)} bad file(s)")
    return 0


def cmd_teachers_import(args: argparse.Namespace) -> int:
    from hpckd.teachers.importer import import_teacher

    out = import_teacher(args.file, args.arch, args.classes, args.out)
    print(f"wrote teacher checkpoint {out} ({args.arch}, {args.classes} classes) from {args.file}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from hpckd.sweep.demo import run_demo
    from hpckd.sweep.executor import SweepStopped

    try:
        return run_demo(args.out, executor=args.executor, epochs_scale=args.epochs_scale, mini=args.mini)
    except SweepStopped as stopped:
        print(f"hpckd: {stopped}; rerun `hpckd demo --out {args.out}` to resume", file=sys.stderr)
        return stopped.exit_code


def cmd_sweep_plan(args: argparse.Namespace) -> int:
    from hpckd.sweep.runner import format_plan
    from hpckd.sweep.spec import plan_sweep

    print(format_plan(plan_sweep(args.config, args.overrides, out_dir=args.out, mini=args.mini)))
    return 0


def cmd_sweep_run(args: argparse.Namespace) -> int:
    from hpckd.sweep.executor import SweepStopped
    from hpckd.sweep.runner import check_executor, default_executor, format_status, results_table, run_sweep
    from hpckd.sweep.spec import plan_sweep

    executor = args.executor or default_executor()
    check_executor(executor)  # before planning writes anything
    plan = plan_sweep(args.config, args.overrides, out_dir=args.out, mini=args.mini)
    try:
        rows = run_sweep(plan, executor, wait=args.wait, poll_s=args.poll)
    except SweepStopped as stopped:
        print(f"hpckd: {stopped}; rerun `hpckd sweep run {args.config}` to resume", file=sys.stderr)
        return stopped.exit_code
    if executor != "slurm" or args.wait:
        print(format_status(rows))
        print(results_table(plan))
    else:
        print(f"follow it with `hpckd sweep status {plan.root}`")
    return 1 if any(r.state in ("failed", "blocked") for r in rows) and (executor != "slurm" or args.wait) else 0


def cmd_sweep_status(args: argparse.Namespace) -> int:
    from hpckd.sweep.runner import format_status, sweep_status

    print(format_status(sweep_status(args.dir)))
    return 0


def cmd_sweep_cancel(args: argparse.Namespace) -> int:
    from hpckd.sweep.runner import cancel_sweep

    keys = cancel_sweep(args.dir, args.trials)
    print(f"cancelled {len(keys)} job(s)" + (f": {', '.join(keys)}" if keys else " (nothing was queued or running)"))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from hpckd.models.complexity import describe_models, format_table

    try:
        rows = describe_models(args.names or None, num_classes=args.num_classes, input_size=args.image_size)
    except (RuntimeError, ValueError) as exc:  # a forward pass at a size the network cannot shrink to
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--image-size {args.image_size} is too small for these models ({first})") from exc
    print(format_table(rows))
    return 0


def cmd_teachers_cache(args: argparse.Namespace) -> int:
    """Write (or finish) the logit store of a config; ``--verify N`` then re-runs the teachers on N entries."""
    from hpckd import dist
    from hpckd.teachers.store_writer import cache, parse_part

    part = parse_part(args.part)
    cfg = load_config(args)
    rc = relaunch_if_needed(cfg, args.argv)
    if rc is not None:
        return rc
    folder = cache(cfg, epochs=args.epochs or int(cfg.optim.epochs), topk=args.topk, out=args.out, part=part, shard_steps=args.shard_steps,
                   verify=args.verify, log=lambda line: print(line, flush=True))
    if dist.info().is_main:
        print(f"teachers cache: {folder}", flush=True)
    dist.shutdown()
    return 0


def cmd_dist_check(args: argparse.Namespace) -> int:
    """Initialise torch.distributed from the launcher and all-reduce each rank's (rank + 1).

    Rank 0 gathers every rank's report and prints them, one line per rank: concurrent writers to one stream
    interleave (mpirun's output forwarding split a line from its newline under load)."""
    import torch

    from hpckd import dist

    info = dist.init("cpu" if args.cpu else "auto")
    value = torch.tensor([float(info.rank + 1)], device=info.device)
    if info.distributed:
        torch.distributed.all_reduce(value)
    expected = info.world_size * (info.world_size + 1) / 2
    report = (f"rank {info.rank}/{info.world_size} launcher={info.launcher} local_rank={info.local_rank} "
              f"device={info.device} all_reduce={value.item():g} expected={expected:g}", value.item() == expected)
    reports = [report]
    if info.distributed:
        reports = [None] * info.world_size
        torch.distributed.all_gather_object(reports, report)
    if info.is_main:
        print("\n".join(line for line, _ in reports), flush=True)
    dist.shutdown()
    return 0 if all(ok for _, ok in reports) else 1
