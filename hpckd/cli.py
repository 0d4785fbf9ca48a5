"""The ``hpckd`` command. Every user error is one line on stderr and a non-zero exit, never a traceback.

``HPCKD_DEBUG=1`` (or ``hpckd --traceback ...``) prints the full chained traceback of a user error instead, for a
bug report. A run with ``dist.nproc_per_node > 1`` started outside any launcher re-runs itself under torchrun
(:func:`_relaunch_if_needed`): the ranks run in their own session, signals to this wrapper are forwarded to them
(they checkpoint and stop), and however many ranks fail, the user sees one error line (rank 0's, or the first
failing rank's) instead of one per rank and torchrun's report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from types import FrameType
from typing import Callable, NoReturn, Sequence

from hpckd.errors import UserError

# Set by the torchrun wrapper for its ranks: each rank writes how it failed into this folder instead of printing.
ERROR_DIR_ENV = "HPCKD_ERROR_DIR"
DEBUG_ENV = "HPCKD_DEBUG"
# What the wrapper forwards to the ranks (SLURM's warning signal, scancel/preemption, Ctrl-C).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line like every other user error (``hpckd CMD --help`` has the rest)."""

    def error(self, message: str) -> NoReturn:
        print(f"hpckd: error: {self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML (default: the built-in defaults)")
    # default=[]: without it argparse reports a '*' positional as required when nothing is given.
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. optim.lr=0.05 data.loader=torch")


def _config_and_overrides(args) -> tuple[str | None, list[str]]:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]  # `hpckd train optim.lr=0.1` without a file
    return config, overrides


def _load(args) -> "object":
    from hpckd.train.experiment import load_experiment

    return load_experiment(*_config_and_overrides(args))


def _relaunch_if_needed(cfg, argv: Sequence[str]) -> int | None:
    """``dist.nproc_per_node > 1`` outside any launcher: run this same command under torchrun; its exit code.

    What can be checked here is checked first, so those errors stay one line: ``out_dir`` writable and not held
    by a live run, the data readable. The ranks then run in their own session: a Ctrl-C at the terminal reaches
    only this wrapper, which forwards it (and SIGTERM, SIGUSR2) to the ranks, waits until they have checkpointed
    and stopped, and exits with 128 + the signal number. Each rank writes how it failed into a folder passed in
    ``HPCKD_ERROR_DIR``; this wrapper prints one of them (:func:`_report_rank_failures`)."""
    from hpckd.dist import detect_launcher

    n = cfg.dist.nproc_per_node
    if n <= 1 or detect_launcher() != "single":
        return None
    from hpckd.data.datasets import check_dataset
    from hpckd.io import check_output_dir
    from hpckd.runlock import check_lock_free

    check_output_dir(cfg.out_dir)
    check_lock_free(cfg.out_dir)
    check_dataset(cfg.data)  # also writes the file-index cache the ranks then reuse
    with tempfile.TemporaryDirectory(prefix="hpckd-ranks-") as errors:
        cmd = [sys.executable, "-c", _LAUNCHER, "--standalone", f"--nproc_per_node={n}", "-m", "hpckd", *argv]
        proc = subprocess.Popen(cmd, env={**os.environ, ERROR_DIR_ENV: errors}, start_new_session=True)
        with _forwarding_signals(proc, errors) as received:
            rc = proc.wait()
        _kill_leftovers(proc.pid, errors)
        return _report_rank_failures(Path(errors), rc, received)


# torchrun in a process of its own, minus its failure report (a traceback and a box per failed rank): the ranks
# say what went wrong themselves. Launcher problems (rendezvous, bad arguments) still raise with a traceback.
_LAUNCHER = "import sys; from hpckd.cli import _launch_ranks; sys.exit(_launch_ranks(sys.argv[1:]))"


def _launch_ranks(torchrun_args: list[str]) -> int:
    """Body of the torchrun process that :func:`_relaunch_if_needed` starts; returns its exit code."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.disable(logging.ERROR)  # torchrun's per-rank failure lines and its OMP_NUM_THREADS notice
    try:
        run(parse_args(torchrun_args))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with {failure.exitcode}")
        _write_rank_record({"kind": "launcher", "rank": rank, "exit_code": 1,
                            "text": f"hpckd: error: rank {rank} (pid {failure.pid}) {how} without reporting an error"},
                           name="launcher")
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as exc:  # torchrun itself was signalled (it stopped the ranks first)
        return 128 + int(exc.sigval)
    return 0


@contextlib.contextmanager
def _forwarding_signals(proc: subprocess.Popen, errors: str):
    """While the ranks run: SIGTERM and SIGUSR2 go to the ranks (torchrun's children), which checkpoint at the
    next step and stop; torchrun then stops the rest. A Ctrl-C (SIGINT) reaches them as SIGTERM, so that it too
    stops them at a checkpoint (the ranks' preemption guard listens to SIGTERM and SIGUSR2); a second Ctrl-C kills
    every process of the run at once. Yields the list of signals received."""
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and signal.SIGINT in received:
            _kill_leftovers(proc.pid, errors)
            return
        received.append(signum)
        ranks = _children(proc.pid)
        # Not torchrun itself: it would die of SIGUSR2 (no handler) and leave the ranks running.
        targets = ranks if ranks else [proc.pid]
        to_ranks = signal.SIGTERM if signum == signal.SIGINT else signum
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, to_ranks if ranks else signal.SIGTERM)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _proc_entries() -> list[Path]:
    """``/proc/<pid>`` of every process (none where there is no ``/proc``: then only torchrun is signalled)."""
    try:
        return [entry for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    """Pids of the live child processes of ``pid`` (Linux ``/proc``)."""
    found = []
    for entry in _proc_entries():
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # Fields after the command (in parentheses, may hold spaces): state, ppid, ...
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _kill_session(sid: int) -> None:
    """SIGKILL every process left in the session (process group) ``sid`` that the wrapper started."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, signal.SIGKILL)


def _kill_leftovers(launcher: int, errors: str) -> None:
    """Nothing of the run may outlive it: torchrun starts each rank in a session of its own, so a rank (or its
    loader worker) that torchrun left behind is found by the ``HPCKD_ERROR_DIR`` value it inherited."""
    _kill_session(launcher)
    marker = f"{ERROR_DIR_ENV}={errors}".encode()
    for entry in _proc_entries():
        if int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue  # exited meanwhile, or not ours
        if marker in environ.split(b"\0"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)


def _write_rank_record(record: dict, name: str | None = None) -> None:
    """Tell the wrapper (through ``HPCKD_ERROR_DIR``) how this rank failed; a no-op outside the wrapper."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder:
        return
    from hpckd.io import atomic_write_json

    rank = os.environ.get("RANK", "0")
    record = {"rank": int(rank), "time_ns": time.monotonic_ns(), **record}
    with contextlib.suppress(OSError):  # the wrapper is gone; nobody is left to tell
        atomic_write_json(Path(folder) / f"{name or 'rank-' + rank}.json", record)


def _read_rank_records(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text()))
    return records


def _report_rank_failures(folder: Path, rc: int, received: list[int]) -> int:
    """Print the one report of a failed run of ranks and return the wrapper's exit code.

    The first user error in time wins (rank 0's when it is the same error, as when every rank checks the same
    thing) over the errors other ranks then met because of it (a collective whose peer left); then a bug's
    traceback; then what torchrun saw. After a forwarded signal the exit code is 128 + its number; rank 0 has
    printed its preemption line already."""
    records = _read_rank_records(folder)

    def first(kind: str) -> dict | None:
        chosen = sorted((r for r in records if r.get("kind") == kind), key=lambda r: r["time_ns"])
        if not chosen:
            return None
        same = [r for r in chosen if r["rank"] == 0 and r.get("message") == chosen[0].get("message")]
        return same[0] if same else chosen[0]

    if received and rc != 0:
        signum = received[0]
        user = first("user")
        if user is not None:
            _print_text(user["text"])
        elif first("stop") is None:
            print(f"hpckd: stopped by {signal.Signals(signum).name} before the ranks reached a checkpoint; "
                  f"rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 128 + signum
    for kind in ("user", "interrupt", "bug", "launcher"):
        record = first(kind)
        if record is not None:
            _print_text(record["text"])
            return int(record.get("exit_code", 1))
    return rc


def _print_text(text: str) -> None:
    print(text, file=sys.stderr, end="" if text.endswith("\n") else "\n", flush=True)


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


def _cmd_efficient(args: argparse.Namespace) -> int:
    from hpckd import dist
    from hpckd.sweep.stages import run_efficient_distillation

    results = run_efficient_distillation(*_config_and_overrides(args), args.strong_teacher, args.epochs, args.form)
    if dist.info().is_main:
        for r in results:
            print(f"{r['name']}: val accuracy {r['metrics']['accuracy']:.3f}")
    dist.shutdown()
    return 0


def _cmd_tstddev(args: argparse.Namespace) -> int:
    cfg = _load(args)
    rc = _relaunch_if_needed(cfg, args.argv)
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


def _cmd_ab_test(args: argparse.Namespace) -> int:
    from hpckd.train.protocols import ab_test

    r = ab_test(args.control, args.treatment, args.output, metric=args.metric)
    print(f"ab-test: p-value {r['p_value']:.4g} ({r['treatment_higher']} of {r['trials']} trials higher under the "
          f"treatment, {args.metric}) -> {args.output}")
    return 0


def _cmd_normalized_accuracy(args: argparse.Namespace) -> int:
    from hpckd.train.protocols import store_normalized_accuracy

    value = store_normalized_accuracy(args.run, args.weak, args.strong, metric=args.metric)
    print(f"normalized {args.metric}: {value:.4f} -> {args.run}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from hpckd.report import summary_table, write_report

    html = write_report(args.dir, args.out)
    print(summary_table(args.dir))
    print(f"report: {html}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from hpckd.bench import run_suites

    report = run_suites(args.suites, args.size, args.device, args.out, args.work)
    print(f"bench ({report['size']}, {report['device']}): {', '.join(report['suites'])} -> {args.out}/bench.json, "
          f"{args.out}/bench.md")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from hpckd.data.synth import SynthSpec, parse_size, write_imagefolder
    from hpckd.io import check_output_dir

    h, w = parse_size(args.size)
    check_output_dir(args.out, "--out")
    counts = write_imagefolder(args.out, SynthSpec(classes=args.classes, per_class=args.per_class,
                                                   val_per_class=args.val_per_class, height=h, width=w, seed=args.seed))
    print(f"wrote {counts['train']} train and {counts['val']} val JPEGs ({args.classes} classes, {h}x{w}) to {args.out}")
    return 0


def _cmd_shard(args: argparse.Namespace) -> int:
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


def _cmd_teachers_import(args: argparse.Namespace) -> int:
    from hpckd.teachers.importer import import_teacher

    out = import_teacher(args.file, args.arch, args.classes, args.out)
    print(f"wrote teacher checkpoint {out} ({args.arch}, {args.classes} classes) from {args.file}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from hpckd.sweep.demo import run_demo
    from hpckd.sweep.executor import SweepStopped

    try:
        return run_demo(args.out, executor=args.executor, epochs_scale=args.epochs_scale, mini=args.mini)
    except SweepStopped as stopped:
        print(f"hpckd: {stopped}; rerun `hpckd demo --out {args.out}` to resume", file=sys.stderr)
        return stopped.exit_code


def _cmd_sweep_plan(args: argparse.Namespace) -> int:
    from hpckd.sweep.runner import format_plan
    from hpckd.sweep.spec import plan_sweep

    print(format_plan(plan_sweep(args.config, args.overrides, out_dir=args.out, mini=args.mini)))
    return 0


def _cmd_sweep_run(args: argparse.Namespace) -> int:
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


def _add_mini_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--mini", action="store_true",
                   help="apply the config's `mini:` override set (tiny models, few epochs, small data); "
                        "writes to OUT_DIR-mini unless --out is given")
    s.add_argument("--out", default=None, help="the sweep folder (instead of the config's out_dir)")


def _cmd_sweep_status(args: argparse.Namespace) -> int:
    from hpckd.sweep.runner import format_status, sweep_status

    print(format_status(sweep_status(args.dir)))
    return 0


def _cmd_sweep_cancel(args: argparse.Namespace) -> int:
    from hpckd.sweep.runner import cancel_sweep

    keys = cancel_sweep(args.dir, args.trials)
    print(f"cancelled {len(keys)} job(s)" + (f": {', '.join(keys)}" if keys else " (nothing was queued or running)"))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from hpckd.models.complexity import describe_models, format_table

    try:
        rows = describe_models(args.names or None, num_classes=args.num_classes, input_size=args.image_size)
    except (RuntimeError, ValueError) as exc:  # a forward pass at a size the network cannot shrink to
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--image-size {args.image_size} is too small for these models ({first})") from exc
    print(format_table(rows))
    return 0


def _cmd_teachers_cache(args: argparse.Namespace) -> int:
    """Write (or finish) the logit store of a config; ``--verify N`` then re-runs the teachers on N entries."""
    from hpckd import dist
    from hpckd.teachers.store_writer import cache, parse_part

    part = parse_part(args.part)
    cfg = _load(args)
    rc = _relaunch_if_needed(cfg, args.argv)
    if rc is not None:
        return rc
    folder = cache(cfg, epochs=args.epochs or int(cfg.optim.epochs), topk=args.topk, out=args.out, part=part, shard_steps=args.shard_steps,
                   verify=args.verify, log=lambda line: print(line, flush=True))
    if dist.info().is_main:
        print(f"teachers cache: {folder}", flush=True)
    dist.shutdown()
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
    parser = _Parser(prog="hpckd", description="Distributed knowledge distillation for data-augmentation studies.")
    parser.add_argument("--traceback", action="store_true",
                        help=f"print the full traceback of an error instead of one line (or set {DEBUG_ENV}=1)")
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
    p.add_argument("--epochs", type=_positive_int, default=300, help="total epochs, split 4:1 between the stages")
    p.add_argument("--form", default="text", choices=["text", "code"],
                   help="text: 240+60 of 300 epochs (the paper); code: 239+61, floors 1e-5 / 5e-4, stage-2 cosine over 62 (its code)")
    p.set_defaults(func=_cmd_efficient)

    p = sub.add_parser("tstddev", help="T. stddev and v-bar/r-bar of the teachers over the training stream (augmentation study)")
    _add_config_args(p)
    p.add_argument("--epochs", type=_positive_int, default=10, help="epochs of the training stream (10 in the paper)")
    p.add_argument("--group-size", type=_positive_int, default=640, help="K rows per group (640 in the paper)")
    p.add_argument("--biased", action="store_true", help="np.var across groups (the public code) instead of Var")
    p.add_argument("--output", default=None, help="results JSON (default: OUT_DIR/tstddev.json)")
    p.set_defaults(func=_cmd_tstddev)

    p = sub.add_parser("ab-test", help="the attention study's A/B-test p-value over paired runs (vKD vs hKD)")
    p.add_argument("--control", nargs="+", required=True, help="run folders of the control (vKD), one per trial")
    p.add_argument("--treatment", nargs="+", required=True, help="run folders of the treatment (hKD), same order")
    p.add_argument("--metric", default="top1_agreement", help="the fidelity metric of results.json (default top1_agreement)")
    p.add_argument("--output", required=True, help="results JSON to write")
    p.set_defaults(func=_cmd_ab_test)

    p = sub.add_parser("normalized-accuracy", help="the response-based study's normalised accuracy of a run against the "
                                                   "weak-only and strong-only runs (Figs. 5-6)")
    p.add_argument("run", help="run folder (or results.json) of the replacement / manipulation experiment")
    p.add_argument("--weak", required=True, help="run distilled from the weak teacher only (acc-)")
    p.add_argument("--strong", required=True, help="run distilled from the strong teacher only (acc+)")
    p.add_argument("--metric", default="accuracy", help="metric of results.json (default accuracy)")
    p.set_defaults(func=_cmd_normalized_accuracy)

    p = sub.add_parser("report", help="a sweep folder's tables and figures: report.md, tables/*.csv, figures/*.png, report.html")
    p.add_argument("dir", help="the sweep's out_dir (with sweep.json)")
    p.add_argument("--out", default=None, help="report folder (default: DIR/report)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("bench", help="throughput suites with same-run baselines -> OUT/bench.json, OUT/bench.md")
    p.add_argument("suites", nargs="*", default=[], metavar="SUITE",
                   help="loaders, teachers, kd-step, overhead, end-to-end, scaling (default: all)")
    p.add_argument("--size", default="small", choices=["tiny", "small", "full"],
                   help="tiny: every suite in a minute or two on 2 CPU cores; full: a GPU node at 224 px")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="runs/bench", help="output folder (bench.json, bench.md, work/)")
    p.add_argument("--work", default=None, help="folder for generated data, teachers and runs (default: OUT/work)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("eval", help="every metric of a checkpoint on a split, written into its run's results.json")
    p.add_argument("checkpoint", help="a checkpoint (e.g. RUN/last.pt) to evaluate")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--augmented", action="store_true", help="the split under the run's training policy (Affinity's D'_val)")
    p.add_argument("--against", nargs="+", metavar="CHECKPOINT",
                   help="compare with these models instead of the run's teachers (e.g. an independent student)")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides of the checkpoint's config, e.g. data.root=/data/x")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="a mini attention study on scikit-learn's digits: 4 teachers, 8 grid trials + 2 baselines, report")
    p.add_argument("--out", default="runs/demo", help="work folder (data, runs, results)")
    p.add_argument("--executor", default="local", choices=["local", "slurm", "debug"], help="where stage jobs run")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every stage's epochs (e.g. 0.3 for a smoke run)")
    p.add_argument("--mini", action="store_true", help="the demo's mini override set: 3 trials, 1 epoch, 16 px (a smoke run)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("sweep", help="a study as one YAML: plan, run (SLURM arrays / local), status, cancel")
    sweep_sub = p.add_subparsers(dest="sweep_command", metavar="SWEEP_COMMAND", required=True)
    s = sweep_sub.add_parser("plan", help="trials, distinct teachers, stages, sbatch resources, GPU-hours; submits nothing")
    s.add_argument("config", help="sweep YAML (e.g. configs/sweeps/demo.yaml)")
    s.add_argument("overrides", nargs="*", default=[], help="dotted sweep keys, e.g. out_dir=runs/x")
    _add_mini_args(s)
    s.set_defaults(func=_cmd_sweep_plan)
    s = sweep_sub.add_parser("run", help="submit every stage (SLURM: arrays with afterok dependencies) or run them here")
    s.add_argument("config", help="sweep YAML")
    s.add_argument("overrides", nargs="*", default=[], help="dotted sweep keys, e.g. out_dir=runs/x")
    s.add_argument("--executor", choices=["slurm", "local", "debug"], default=None,
                   help="slurm (default where sbatch is on PATH), local (this machine), debug (in this process)")
    s.add_argument("--wait", action="store_true", help="SLURM: follow the sweep until no job is queued or running")
    s.add_argument("--poll", type=float, default=5.0, help="seconds between status reads with --wait")
    _add_mini_args(s)
    s.set_defaults(func=_cmd_sweep_run)
    s = sweep_sub.add_parser("status", help="each job's state, job id, elapsed time, last error and log")
    s.add_argument("dir", help="the sweep's out_dir")
    s.set_defaults(func=_cmd_sweep_status)
    s = sweep_sub.add_parser("cancel", help="cancel the queued and running jobs (of the named trials)")
    s.add_argument("dir", help="the sweep's out_dir")
    s.add_argument("trials", nargs="*", default=[], help="trial or teacher names (default: every job)")
    s.set_defaults(func=_cmd_sweep_cancel)

    p = sub.add_parser("data", help="data utilities")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    s = data_sub.add_parser("synth", help="write a generated ImageFolder data set (train/ and val/) of JPEGs")
    s.add_argument("--out", required=True)
    s.add_argument("--classes", type=_positive_int, default=10)
    s.add_argument("--per-class", type=_positive_int, default=100, help="training images per class")
    s.add_argument("--val-per-class", type=_positive_int, default=20)
    s.add_argument("--size", default="32x32", help="HxW, e.g. 32x32 or 375x500")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_synth)
    s = data_sub.add_parser("shard", help="write WebDataset tar shards (image, int32 label, int64 id) from an ImageFolder split")
    s.add_argument("--src", required=True, help="ImageFolder split, e.g. data/imagenet/train")
    s.add_argument("--out", required=True, help="output folder for shard-*.tar and wds.json")
    s.add_argument("--max-count", type=_positive_int, default=1000, help="samples per shard")
    s.add_argument("--seed", type=int, default=0, help="seed of the sample order inside the shards")
    s.add_argument("--on-bad-image", default="error", choices=["error", "skip"])
    s.set_defaults(func=_cmd_shard)

    p = sub.add_parser("models", help="list registered models with parameters and MACs")
    p.add_argument("names", nargs="*")
    p.add_argument("--image-size", type=_positive_int, default=None, help="input size for MACs (default: the model's native size)")
    p.add_argument("--num-classes", type=_positive_int, default=None, help="classifier size (default: the model family's usual)")
    p.set_defaults(func=_cmd_models)

    t = sub.add_parser("teachers", help="teacher utilities: the logit store (cache), importing published teachers (import)")
    teachers_sub = t.add_subparsers(dest="teachers_command", metavar="TEACHERS_COMMAND", required=True)
    s = teachers_sub.add_parser("cache", help="precompute the teachers' logits on every view of E epochs (a logit store)")
    _add_config_args(s)
    s.add_argument("--epochs", type=_positive_int, default=None, help="epochs to store (default: optim.epochs)")
    s.add_argument("--topk", type=int, default=0, help="store top-k logits + remaining mass (0: full fp16 logits)")
    s.add_argument("--out", default=None, help="store folder (default: stores/<hash of what determines it>)")
    s.add_argument("--part", default="0/1", help="i/n: write the i-th of n slices (array tasks)")
    s.add_argument("--shard-steps", type=int, default=0, help="global micro-batches per shard (default: ~4096 rows)")
    s.add_argument("--verify", type=int, default=0, metavar="N",
                   help="then re-run the teachers on N random stored entries, replaying their views, and compare")
    s.set_defaults(func=_cmd_teachers_cache)
    s = teachers_sub.add_parser("import", help="turn a local torchvision/timm state dict or a RepDistiller CIFAR "
                                               "teacher into an hpckd teacher checkpoint")
    s.add_argument("file", help="local weights file (.pth/.pt)")
    s.add_argument("--arch", required=True, help="hpckd architecture name (see `hpckd models`)")
    s.add_argument("--classes", type=_positive_int, required=True, help="number of classes of the file's classifier")
    s.add_argument("--out", default=None, help="output checkpoint (default: FILE's name with .hpckd.pt)")
    s.set_defaults(func=_cmd_teachers_import)

    p = sub.add_parser("dist-check", help="initialise torch.distributed from the launcher (torchrun/srun/mpirun/submitit) and all-reduce")
    p.add_argument("--cpu", action="store_true", help="use gloo on CPU even when a GPU is present")
    p.set_defaults(func=_cmd_dist_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # --traceback anywhere (`hpckd train --traceback x=1` too); argv keeps it for the ranks of a relaunch.
    traceback_flag = "--traceback" in argv
    # Overrides may follow options (`hpckd eval ckpt --augmented data.root=x`), which plain argparse rejects.
    args, extra = parser.parse_known_args([a for a in argv if a != "--traceback"])
    if extra and (not hasattr(args, "overrides") or not all("=" in e and not e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.argv = argv
    debug = traceback_flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    previous_show_warning, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        text = traceback.format_exc() if debug else f"hpckd: error: {prefix}{exc}\n"
        return _fail("user", text, exc.exit_code, message=str(exc))
    except KeyboardInterrupt:
        return _fail("interrupt", "hpckd: interrupted\n", 130)
    except SystemExit as exc:
        if getattr(exc, "message", None):  # a preemption stop: rank 0 has printed its line already
            _write_rank_record({"kind": "stop", "exit_code": exc.code, "text": str(exc.message)})
        raise
    except Exception:
        if not _under_wrapper():
            raise  # a bug: the traceback, as Python prints it
        return _fail("bug", traceback.format_exc(), 1)
    finally:
        warnings.showwarning = previous_show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """hpckd's own warnings as one ``hpckd: warning: ...`` line (not Python's two-line format), from rank 0
    only; a rank under the torchrun wrapper drops the data warnings that the wrapper has printed already."""
    if not category.__module__.startswith("hpckd."):
        (sys.stderr if file is None else file).write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    if os.environ.get("RANK", "0") != "0" or (_under_wrapper() and category.__name__ == "SkippedDataWarning"):
        return
    print(f"hpckd: warning: {message}", file=sys.stderr if file is None else file, flush=True)


def _under_wrapper() -> bool:
    """A rank started by :func:`_relaunch_if_needed` (which collects the ranks' failures)."""
    return bool(os.environ.get(ERROR_DIR_ENV)) and os.environ.get("RANK") is not None


def _fail(kind: str, text: str, exit_code: int, message: str | None = None) -> int:
    """Report a failure: printed, or (in a rank under the torchrun wrapper) handed to the wrapper, which prints
    one report for all ranks."""
    if _under_wrapper():
        _write_rank_record({"kind": kind, "exit_code": exit_code, "text": text, "message": message})
    else:
        print(text, file=sys.stderr, end="")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
