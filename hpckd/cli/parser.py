"""The ``hpckd`` command line: one subcommand per task, each bound to its function in :mod:`hpckd.cli.commands`.
Usage errors are one line, like every other user error."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from hpckd.cli import commands

DEBUG_ENV = "HPCKD_DEBUG"  # set to 1: a user error prints its full traceback (as --traceback does)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line like every other user error (``hpckd CMD --help`` has the rest)."""

    def error(self, message: str) -> NoReturn:
        print(f"hpckd: error: {self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML (default: the built-in defaults)")
    # default=[]: without it argparse reports a '*' positional as required when nothing is given.
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. optim.lr=0.05 data.loader=torch")


def add_mini_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--mini", action="store_true",
                   help="apply the config's `mini:` override set (tiny models, few epochs, small data); "
                        "writes to OUT_DIR-mini unless --out is given")
    s.add_argument("--out", default=None, help="the sweep folder (instead of the config's out_dir)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hpckd", description="Distributed knowledge distillation for data-augmentation studies.")
    parser.add_argument("--traceback", action="store_true",
                        help=f"print the full traceback of an error instead of one line (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train (or fine-tune) a teacher with cross-entropy")
    add_config_args(p)
    p.set_defaults(func=commands.cmd_run("train"))

    p = sub.add_parser("distill", help="distill a student from the teachers of a config")
    add_config_args(p)
    p.set_defaults(func=commands.cmd_run("distill"))

    p = sub.add_parser("distill-efficient", help="Efficient Distillation (response-based study): WSL stage, then CKM with a stronger teacher")
    add_config_args(p)
    p.add_argument("--strong-teacher", required=True, help="checkpoint of the stronger teacher used in stage 2")
    p.add_argument("--epochs", type=positive_int, default=300, help="total epochs, split 4:1 between the stages")
    p.add_argument("--form", default="text", choices=["text", "code"],
                   help="text: 240+60 of 300 epochs (the paper); code: 239+61, floors 1e-5 / 5e-4, stage-2 cosine over 62 (its code)")
    p.set_defaults(func=commands.cmd_efficient)

    p = sub.add_parser("tstddev", help="T. stddev and v-bar/r-bar of the teachers over the training stream (augmentation study)")
    add_config_args(p)
    p.add_argument("--epochs", type=positive_int, default=10, help="epochs of the training stream (10 in the paper)")
    p.add_argument("--group-size", type=positive_int, default=640, help="K rows per group (640 in the paper)")
    p.add_argument("--biased", action="store_true", help="np.var across groups (the public code) instead of Var")
    p.add_argument("--output", default=None, help="results JSON (default: OUT_DIR/tstddev.json)")
    p.set_defaults(func=commands.cmd_tstddev)

    p = sub.add_parser("ab-test", help="the attention study's A/B-test p-value over paired runs (vKD vs hKD)")
    p.add_argument("--control", nargs="+", required=True, help="run folders of the control (vKD), one per trial")
    p.add_argument("--treatment", nargs="+", required=True, help="run folders of the treatment (hKD), same order")
    p.add_argument("--metric", default="top1_agreement", help="the fidelity metric of results.json (default top1_agreement)")
    p.add_argument("--output", required=True, help="results JSON to write")
    p.set_defaults(func=commands.cmd_ab_test)

    p = sub.add_parser("normalized-accuracy", help="the response-based study's normalised accuracy of a run against the "
                                                   "weak-only and strong-only runs (Figs. 5-6)")
    p.add_argument("run", help="run folder (or results.json) of the replacement / manipulation experiment")
    p.add_argument("--weak", required=True, help="run distilled from the weak teacher only (acc-)")
    p.add_argument("--strong", required=True, help="run distilled from the strong teacher only (acc+)")
    p.add_argument("--metric", default="accuracy", help="metric of results.json (default accuracy)")
    p.set_defaults(func=commands.cmd_normalized_accuracy)

    p = sub.add_parser("report", help="a sweep folder's tables and figures: report.md, tables/*.csv, figures/*.png, report.html")
    p.add_argument("dir", help="the sweep's out_dir (with sweep.json)")
    p.add_argument("--out", default=None, help="report folder (default: DIR/report)")
    p.set_defaults(func=commands.cmd_report)

    p = sub.add_parser("bench", help="throughput suites with same-run baselines -> OUT/bench.json, OUT/bench.md")
    p.add_argument("suites", nargs="*", default=[], metavar="SUITE",
                   help="loaders, teachers, kd-step, overhead, end-to-end, scaling (default: all)")
    p.add_argument("--size", default="small", choices=["tiny", "small", "full"],
                   help="tiny: every suite in a minute or two on 2 CPU cores; full: a GPU node at 224 px")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="runs/bench", help="output folder (bench.json, bench.md, work/)")
    p.add_argument("--work", default=None, help="folder for generated data, teachers and runs (default: OUT/work)")
    p.set_defaults(func=commands.cmd_bench)

    p = sub.add_parser("eval", help="every metric of a checkpoint on a split, written into its run's results.json")
    p.add_argument("checkpoint", help="a checkpoint (e.g. RUN/last.pt) to evaluate")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--augmented", action="store_true", help="the split under the run's training policy (Affinity's D'_val)")
    p.add_argument("--against", nargs="+", metavar="CHECKPOINT",
                   help="compare with these models instead of the run's teachers (e.g. an independent student)")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides of the checkpoint's config, e.g. data.root=/data/x")
    p.set_defaults(func=commands.cmd_eval)

    p = sub.add_parser("demo", help="a mini attention study on scikit-learn's digits: 4 teachers, 8 grid trials + 2 baselines, report")
    p.add_argument("--out", default="runs/demo", help="work folder (data, runs, results)")
    p.add_argument("--executor", default="local", choices=["local", "slurm", "debug"], help="where stage jobs run")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every stage's epochs (e.g. 0.3 for a smoke run)")
    p.add_argument("--mini", action="store_true", help="the demo's mini override set: 3 trials, 1 epoch, 16 px (a smoke run)")
    p.set_defaults(func=commands.cmd_demo)

    p = sub.add_parser("sweep", help="a study as one YAML: plan, run (SLURM arrays / local), status, cancel")
    sweep_sub = p.add_subparsers(dest="sweep_command", metavar="SWEEP_COMMAND", required=True)
    s = sweep_sub.add_parser("plan", help="trials, distinct teachers, stages, sbatch resources, GPU-hours; submits nothing")
    s.add_argument("config", help="sweep YAML (e.g. configs/sweeps/demo.yaml)")
    s.add_argument("overrides", nargs="*", default=[], help="dotted sweep keys, e.g. out_dir=runs/x")
    add_mini_args(s)
    s.set_defaults(func=commands.cmd_sweep_plan)
    s = sweep_sub.add_parser("run", help="submit every stage (SLURM: arrays with afterok dependencies) or run them here")
    s.add_argument("config", help="sweep YAML")
    s.add_argument("overrides", nargs="*", default=[], help="dotted sweep keys, e.g. out_dir=runs/x")
    s.add_argument("--executor", choices=["slurm", "local", "debug"], default=None,
                   help="slurm (default where sbatch is on PATH), local (this machine), debug (in this process)")
    s.add_argument("--wait", action="store_true", help="SLURM: follow the sweep until no job is queued or running")
    s.add_argument("--poll", type=float, default=5.0, help="seconds between status reads with --wait")
    add_mini_args(s)
    s.set_defaults(func=commands.cmd_sweep_run)
    s = sweep_sub.add_parser("status", help="each job's state, job id, elapsed time, last error and log")
    s.add_argument("dir", help="the sweep's out_dir")
    s.set_defaults(func=commands.cmd_sweep_status)
    s = sweep_sub.add_parser("cancel", help="cancel the queued and running jobs (of the named trials)")
    s.add_argument("dir", help="the sweep's out_dir")
    s.add_argument("trials", nargs="*", default=[], help="trial or teacher names (default: every job)")
    s.set_defaults(func=commands.cmd_sweep_cancel)

    p = sub.add_parser("data", help="data utilities")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    s = data_sub.add_parser("synth", help="write a generated ImageFolder data set (train/ and val/) of JPEGs")
    s.add_argument("--out", required=True)
    s.add_argument("--classes", type=positive_int, default=10)
    s.add_argument("--per-class", type=positive_int, default=100, help="training images per class")
    s.add_argument("--val-per-class", type=positive_int, default=20)
    s.add_argument("--size", default="32x32", help="HxW, e.g. 32x32 or 375x500")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=commands.cmd_synth)
    s = data_sub.add_parser("shard", help="write WebDataset tar shards (image, int32 label, int64 id) from an ImageFolder split")
    s.add_argument("--src", required=True, help="ImageFolder split, e.g. data/imagenet/train")
    s.add_argument("--out", required=True, help="output folder for shard-*.tar and wds.json")
    s.add_argument("--max-count", type=positive_int, default=1000, help="samples per shard")
    s.add_argument("--seed", type=int, default=0, help="seed of the sample order inside the shards")
    s.add_argument("--on-bad-image", default="error", choices=["error", "skip"])
    s.set_defaults(func=commands.cmd_shard)

    p = sub.add_parser("models", help="list registered models with parameters and MACs")
    p.add_argument("names", nargs="*")
    p.add_argument("--image-size", type=positive_int, default=None, help="input size for MACs (default: the model's native size)")
    p.add_argument("--num-classes", type=positive_int, default=None, help="classifier size (default: the model family's usual)")
    p.set_defaults(func=commands.cmd_models)

    t = sub.add_parser("teachers", help="teacher utilities: the logit store (cache), importing published teachers (import)")
    teachers_sub = t.add_subparsers(dest="teachers_command", metavar="TEACHERS_COMMAND", required=True)
    s = teachers_sub.add_parser("cache", help="precompute the teachers' logits on every view of E epochs (a logit store)")
    add_config_args(s)
    s.add_argument("--epochs", type=positive_int, default=None, help="epochs to store (default: optim.epochs)")
    s.add_argument("--topk", type=int, default=0, help="store top-k logits + remaining mass (0: full fp16 logits)")
    s.add_argument("--out", default=None, help="store folder (default: stores/<hash of what determines it>)")
    s.add_argument("--part", default="0/1", help="i/n: write the i-th of n slices (array tasks)")
    s.add_argument("--shard-steps", type=int, default=0, help="global micro-batches per shard (default: ~4096 rows)")
    s.add_argument("--verify", type=int, default=0, metavar="N",
                   help="then re-run the teachers on N random stored entries, replaying their views, and compare")
    s.set_defaults(func=commands.cmd_teachers_cache)
    s = teachers_sub.add_parser("import", help="turn a local torchvision/timm state dict or a RepDistiller CIFAR "
                                               "teacher into an hpckd teacher checkpoint")
    s.add_argument("file", help="local weights file (.pth/.pt)")
    s.add_argument("--arch", required=True, help="hpckd architecture name (see `hpckd models`)")
    s.add_argument("--classes", type=positive_int, required=True, help="number of classes of the file's classifier")
    s.add_argument("--out", default=None, help="output checkpoint (default: FILE's name with .hpckd.pt)")
    s.set_defaults(func=commands.cmd_teachers_import)

    p = sub.add_parser("dist-check", help="initialise torch.distributed from the launcher (torchrun/srun/mpirun/submitit) and all-reduce")
    p.add_argument("--cpu", action="store_true", help="use gloo on CPU even when a GPU is present")
    p.set_defaults(func=commands.cmd_dist_check)
    return parser
