"""The ``hpckd`` command. Every user error is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Callable, Sequence

from hpckd.errors import UserError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 data.loader=torch")


def _config_and_overrides(args) -> tuple[str | None, list[str]]:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]  # `hpckd train optim.lr=0.1` without a file
    return config, overrides


def _load(args) -> "object":
    from hpckd.config import load_config

    return load_config(*_config_and_overrides(args))


def _relaunch_if_needed(cfg, argv: Sequence[str]) -> int | None:
    """``dist.nproc_per_node > 1`` outside any launcher: run this same command under torchrun."""
    from hpckd.dist import detect_launcher

    n = cfg.dist.nproc_per_node
    if n <= 1 or detect_launcher() != "single":
        return None
    # Validate what can be validated here, so user errors stay one line instead of N child tracebacks.
    from hpckd.data.datasets import check_dataset

    check_dataset(cfg.data)  # also writes the file-index cache the ranks then reuse
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "hpckd", *argv]
    return subprocess.call(cmd)


def _cmd_run(mode: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        cfg = _load(args)
        rc = _relaunch_if_needed(cfg, args.argv)
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


def _cmd_eval(args: argparse.Namespace) -> int:
    from hpckd import dist
    from hpckd.metrics.runner import evaluate_checkpoint

    results = evaluate_checkpoint(args.checkpoint, split=args.split, augmented=args.augmented, overrides=args.overrides)
    if dist.info().is_main:
        for key, metrics in results.items():
            shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("accuracy", "nll", "ece", "top1_agreement", "predictive_kl")
                              if k in metrics)
            print(f"eval {key}: {shown} (n={int(metrics['count'])})")
    dist.shutdown()
    return 0


def _cmd_efficient(args: argparse.Namespace) -> int:
    from hpckd import dist
    from hpckd.sweep.stages import run_efficient_distillation

    results = run_efficient_distillation(*_config_and_overrides(args), args.strong_teacher, args.epochs)
    if dist.info().is_main:
        for r in results:
            print(f"{r['name']}: val accuracy {r['metrics']['accuracy']:.3f}")
    dist.shutdown()
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from hpckd.data.synth import SynthSpec, parse_size, write_imagefolder

    h, w = parse_size(args.size)
    counts = write_imagefolder(args.out, SynthSpec(classes=args.classes, per_class=args.per_class,
                                                   val_per_class=args.val_per_class, height=h, width=w, seed=args.seed))
    print(f"wrote {counts['train']} train and {counts['val']} val JPEGs ({args.classes} classes, {h}x{w}) to {args.out}")
    return 0


def _cmd_shard(args: argparse.Namespace) -> int:
    from hpckd.data.index import build_index
    from hpckd.data.wds import write_shards

    index = build_index(args.src, args.on_bad_image, cache=None)
    manifest = write_shards(index, args.out, max_count=args.max_count, seed=args.seed)
    print(f"wrote {manifest['count']} samples ({len(index.classes)} classes) in {len(manifest['shards'])} shard(s) "
          f"to {args.out}; skipped {len(index.skipped)} bad file(s)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from hpckd.sweep.demo import run_demo

    run_demo(args.out, executor=args.executor, epochs_scale=args.epochs_scale)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from hpckd.models.complexity import describe_models, format_table

    print(format_table(describe_models(args.names or None, num_classes=args.num_classes, input_size=args.image_size)))
    return 0


def _cmd_dist_check(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpckd", description="Distributed knowledge distillation for data-augmentation studies.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train (or fine-tune) a teacher with cross-entropy")
    _add_config_args(p)
    p.set_defaults(func=_cmd_run("train"))

    p = sub.add_parser("distill", help="distill a student from the teachers of a config")
    _add_config_args(p)
    p.set_defaults(func=_cmd_run("distill"))

    p = sub.add_parser("distill-efficient", help="Efficient Distillation (response-based study): WSL stage, then CKM with a stronger teacher")
    _add_config_args(p)
    p.add_argument("--strong-teacher", required=True, help="checkpoint of the stronger teacher used in stage 2")
    p.add_argument("--epochs", type=int, default=300, help="total epochs, split 4:1 between the stages")
    p.set_defaults(func=_cmd_efficient)

    p = sub.add_parser("eval", help="every metric of a checkpoint on a split, written into its run's results.json")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--augmented", action="store_true", help="the split under the run's training policy (Affinity's D'_val)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the checkpoint's config, e.g. data.root=/data/x")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="generate data, train 2 teachers (weak/strong), distill students per trial, print a table")
    p.add_argument("--out", default="runs/demo", help="work folder (data, runs, results)")
    p.add_argument("--executor", default="local", choices=["local", "slurm", "debug"], help="where stage jobs run")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every stage's epochs (e.g. 0.3 for a smoke run)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("data", help="data utilities")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    s = data_sub.add_parser("synth", help="write a generated ImageFolder data set (train/ and val/) of JPEGs")
    s.add_argument("--out", required=True)
    s.add_argument("--classes", type=int, default=10)
    s.add_argument("--per-class", type=int, default=100, help="training images per class")
    s.add_argument("--val-per-class", type=int, default=20)
    s.add_argument("--size", default="32x32", help="HxW, e.g. 32x32 or 375x500")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_synth)
    s = data_sub.add_parser("shard", help="write WebDataset tar shards (image, int32 label, int64 id) from an ImageFolder split")
    s.add_argument("--src", required=True, help="ImageFolder split, e.g. data/imagenet/train")
    s.add_argument("--out", required=True, help="output folder for shard-*.tar and wds.json")
    s.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    s.add_argument("--seed", type=int, default=0, help="seed of the sample order inside the shards")
    s.add_argument("--on-bad-image", default="error", choices=["error", "skip"])
    s.set_defaults(func=_cmd_shard)

    p = sub.add_parser("models", help="list registered models with parameters and MACs")
    p.add_argument("names", nargs="*")
    p.add_argument("--image-size", type=int, default=None, help="input size for MACs (default: the model's native size)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model family's usual)")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("dist-check", help="initialise torch.distributed from the launcher (torchrun/srun/mpirun/submitit) and all-reduce")
    p.add_argument("--cpu", action="store_true", help="use gloo on CPU even when a GPU is present")
    p.set_defaults(func=_cmd_dist_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Overrides may follow options (`hpckd eval ckpt --augmented data.root=x`), which plain argparse rejects.
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or not all("=" in e and not e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"hpckd: error: {prefix}{exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hpckd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
