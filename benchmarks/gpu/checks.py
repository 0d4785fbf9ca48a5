#!/usr/bin/env python3
"""GPU checks of hpckd: every CUDA path, each against an independent reference where one exists; a JSON report.

Not a test suite (CI runs ``tests/`` on CPU machines); a script for a session that has the lent GPU machine:

    python3 benchmarks/gpu/checks.py --device cuda --out gpu_checks.json            # everything (~15 min)
    python3 benchmarks/gpu/checks.py --device cuda --groups core --budget-s 450     # one call's share
    python3 benchmarks/gpu/checks.py --device cpu --quick                           # what a CPU machine can run
    python3 benchmarks/gpu/checks.py --list

Each check runs in its own subprocess (a crash, a hang or a poisoned CUDA context stays with that check) under a
time limit; the report is rewritten after every check, so a killed run still leaves what it finished. A failed
check records the last line of its traceback and the run goes on. Statuses: ``pass``, ``warn`` (ran, but a number
is outside the expected band; read ``note``), ``fail``, ``skip`` (e.g. DALI not importable), ``not_run`` (GPU-only
check on ``--device cpu``, not in ``--quick``, over ``--budget-s``, or filtered out).

Groups (one per device call of the plan in ``run.sh``):

* ``core``: environment, ``hpckd.dist.cuda_index``/``select_device``, an NCCL process group of world size 1 under
  DDP (gradients equal to the unwrapped model's) and the exact int64 all-reduce over NCCL, ``hpckd dist-check``
  under torchrun, autocast/GradScaler, teacher serving (bf16 autocast + channels-last vs an fp32 CPU reference,
  and ``torch.compile``), and ``hpckd train``/``distill`` runs on generated data for fp32, bf16, fp16 +
  GradScaler, channels-last with bf16 images, SyncBatchNorm, ``torch.compile``, a device-side batch op, distillation
  with inline teachers and CutMixPick: each must finish, write ``results.json`` and learn (val accuracy well above
  chance, training loss down).
* ``deepspeed``: ZeRO 2 fp32 against DDP fp32 (same job: histories compared), ZeRO 1 bf16, ZeRO 2 bf16 with
  channels-last inputs, ZeRO 0 fp16, DeepSpeed's ``engine.compile()``.
* ``dali``: ``DaliLoader`` on ``cuda:0`` (``device='mixed'`` nvJPEG decoding, GPU augmentation) against the same
  loader on the CPU for the same batch (same seed, so the same recorded parameters): the parameters must be equal,
  the pixels close (max/mean/p99 differences reported in grey levels; encoded JPEGs also carry nvJPEG-vs-libjpeg
  decoder differences, so raw pixels are compared too, which isolates the GPU operators), for the weak/strong
  imagenet and cifar policies, AutoAugment-ImageNet, TrivialAugment and the ``_jitter`` GPU branch; determinism;
  DALI vs the torch renderer (informative); training and distillation with DALI on the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
GROUPS = ("core", "deepspeed", "dali")

# The training job every `hpckd train` check runs (generated 32x32 data, 4 classes, chance = 0.25).
CLASSES, PER_CLASS, VAL_PER_CLASS, EPOCHS, BATCH = 4, 64, 25, 4, 32
STEPS = EPOCHS * (CLASSES * PER_CLASS // BATCH)
MIN_ACCURACY = 0.45
TRAIN_BASE = ["model.arch=resnet8", "aug=none", "data.family=cifar", "data.image_size=32", "data.loader=torch",
              "data.num_workers=2", f"data.batch_size={BATCH}", "data.eval_batch_size=50", f"optim.epochs={EPOCHS}",
              "optim.lr=0.05", "log_every=4", "resume=never", "seed=0"]


class CheckFailed(Exception):
    def __init__(self, message: str, numbers: dict | None = None) -> None:
        super().__init__(message)
        self.numbers = numbers or {}


class Unavailable(Exception):
    """A prerequisite is missing (e.g. DALI not importable): the check is skipped, not failed."""


@dataclass
class Check:
    name: str
    group: str
    fn: Callable[["Ctx"], dict]
    devices: tuple[str, ...]
    quick: bool
    timeout: float
    doc: str
    smoke: bool = False  # a GPU check that --device cpu runs CPU-against-CPU, as a smoke test of its code




REGISTRY: dict[str, Check] = {}


def check(group: str, devices: tuple[str, ...] = ("cuda", "cpu"), quick: bool = False, timeout: float = 240,
          smoke: bool = False):
    """Register a check. ``devices``: where it means something; ``quick``: part of ``--device cpu --quick``;
    ``smoke``: a GPU check whose CPU run only compares the CPU with itself (reported as such)."""
    def wrap(fn):
        REGISTRY[fn.__name__] = Check(fn.__name__, group, fn, devices, quick, timeout, (fn.__doc__ or "").strip(),
                                      smoke)
        return fn
    return wrap


# ================================================================================================ context


class Ctx:
    """What a check gets: the device, a work folder (shared by checks, kept between calls), helpers."""

    def __init__(self, device: str, work: Path, quick: bool) -> None:
        self.device, self.work, self.quick = device, work, quick
        self.cuda = device == "cuda"
        self.numbers: dict[str, Any] = {}

    # --------------------------------------------------------------------------------------- data
    def synth(self, name: str) -> Path:
        """A generated ImageFolder (cached in the work folder): ``small32`` for training, ``jpeg375`` (375x500
        JPEGs, ImageNet-like) and ``cifar32`` for the loader comparisons."""
        from hpckd.data.synth import SynthSpec, write_imagefolder

        specs = {
            "small32": SynthSpec(classes=CLASSES, per_class=PER_CLASS, val_per_class=VAL_PER_CLASS, seed=0),
            "jpeg375": SynthSpec(classes=4, per_class=8, val_per_class=2, height=375, width=500, seed=1),
            "cifar32": SynthSpec(classes=4, per_class=16, val_per_class=2, seed=2),
        }
        root = self.work / "data" / name
        if not (root / ".complete").is_file():
            shutil.rmtree(root, ignore_errors=True)
            write_imagefolder(root, specs[name])
            (root / ".complete").touch()
        return root

    # --------------------------------------------------------------------------------------- hpckd runs
    def hpckd(self, args: list[str], name: str, timeout: float = 600, env: dict | None = None,
              launcher: list[str] | None = None) -> subprocess.CompletedProcess:
        """``python -m hpckd ARGS`` (optionally under a launcher) in a fresh process; output kept in runs/NAME.log."""
        cmd = (launcher or [sys.executable]) + ["-m", "hpckd", *args]
        full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
        log = self.work / "runs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
        log.write_text(f"$ {' '.join(cmd)}\n# rc={proc.returncode} in {time.time() - t0:.1f} s\n"
                       f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}\n")
        return proc

    def train_args(self, name: str, extra: list[str], mode: str = "train") -> list[str]:
        return [mode, *TRAIN_BASE, f"data.root={self.synth('small32')}", f"out_dir={self.run_dir(name)}",
                f"name={name}", f"dist.device={self.device}", *extra]

    def run_dir(self, name: str) -> Path:
        return self.work / "runs" / f"{name}-{self.device}"

    def train(self, name: str, extra: list[str], mode: str = "train", timeout: float = 600,
              config: Path | None = None, expect: dict | None = None, env: dict | None = None) -> dict:
        """Run a training job and check it: exit 0, results.json, the right backend/precision/device, every step
        taken, learning. Returns its numbers (and records them on the check)."""
        args = self.train_args(name, extra, mode)
        if config is not None:
            args.insert(1, str(config))
        shutil.rmtree(self.run_dir(name), ignore_errors=True)  # no stale results.json from an earlier run
        t0 = time.time()
        proc = self.hpckd(args, f"{name}-{self.device}", timeout=timeout, env=env)
        wall = time.time() - t0
        out = self.run_dir(name)
        if proc.returncode != 0:
            raise CheckFailed(f"hpckd {mode} exited {proc.returncode}: {last_line(proc.stderr or proc.stdout)}",
                              {"wall_s": round(wall, 1)})
        results_path = out / "results.json"
        if not results_path.is_file():
            raise CheckFailed("no results.json written", {"wall_s": round(wall, 1)})
        res = json.loads(results_path.read_text())
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
        start = next(r for r in log if r["event"] == "start")
        steps = [r for r in log if r["event"] == "step"]
        hist = res["history"]
        numbers = {
            "wall_s": round(wall, 1), "accuracy": res["metrics"].get("accuracy"), "steps": res["steps"],
            "first_train_loss": round(hist[0]["train_loss"], 4), "last_train_loss": round(hist[-1]["train_loss"], 4),
            "train_images_per_s": round(res["timings"]["train_images_per_s"] or 0, 1),
            "device": start["device"], "backend": res["backend"], "precision": res["precision"],
            "gpu_mem_gib": max((r.get("gpu_mem_gib") or 0 for r in steps), default=None),
        }
        if "top1_agreement" in res["metrics"]:
            numbers["top1_agreement"] = res["metrics"]["top1_agreement"]
        self.numbers.update(numbers)
        problems = []
        want_device = "cuda:0" if self.cuda else "cpu"
        if start["device"] != want_device:
            problems.append(f"ran on {start['device']}, not {want_device}")
        for key, value in (expect or {}).items():
            if res.get(key) != value:
                problems.append(f"results {key}={res.get(key)!r}, expected {value!r}")
        if res["steps"] != STEPS:
            problems.append(f"{res['steps']} steps, expected {STEPS}")
        if not all(math.isfinite(h["train_loss"]) for h in hist):
            problems.append("non-finite training loss")
        if not hist[-1]["train_loss"] < hist[0]["train_loss"]:
            problems.append(f"training loss did not fall ({hist[0]['train_loss']:.3f} -> {hist[-1]['train_loss']:.3f})")
        acc = res["metrics"].get("accuracy") or 0.0
        if acc < MIN_ACCURACY:
            problems.append(f"val accuracy {acc:.3f} < {MIN_ACCURACY} (chance {1 / CLASSES:.2f})")
        if problems:
            raise CheckFailed("; ".join(problems), numbers)
        return numbers

    def teachers(self) -> list[Path]:
        """Two teacher checkpoints (the fp32 and bf16 DDP runs of group core; trained here if missing)."""
        paths = []
        for name, extra in (("ddp_fp32", []), ("ddp_bf16", ["train.precision=bf16"])):
            ckpt = self.run_dir(name) / "last.pt"
            if not ckpt.is_file():
                saved = dict(self.numbers)
                self.train(name, extra)
                self.numbers = saved
            paths.append(ckpt)
        return paths

    def distill_config(self, teachers: list[Path], teacher_augs: list[str | None] | None = None) -> Path:
        augs = teacher_augs or [None] * len(teachers)
        lines = ["teachers:"]
        for path, aug in zip(teachers, augs):
            lines += [f"  - checkpoint: {path}"] + ([f"    aug: {aug}"] if aug else [])
        path = self.work / "runs" / f"distill-{len(teachers)}-{'-'.join(a or 'same' for a in augs)}.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path

    @property
    def torch_device(self):
        import torch

        return torch.device("cuda", 0) if self.cuda else torch.device("cpu")


def last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:400] if lines else ""


def need_dali() -> None:
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:  # ImportError, or a library that fails to load
        raise Unavailable(f"NVIDIA DALI not importable ({type(exc).__name__}: {last_line(str(exc))})") from None


def need_deepspeed() -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise Unavailable("DeepSpeed is not installed")


# ================================================================================================ core


@check("core", quick=True, timeout=120)
def env(ctx: Ctx) -> dict:
    """Versions and hardware; on cuda the GPU must be visible and support bf16."""
    import importlib.metadata as md

    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda_runtime": torch.version.cuda, "cpu_count": os.cpu_count()}
    for dist_name in ("torchvision", "numpy", "omegaconf", "submitit", "deepspeed", "pydantic", "nvidia-dali-cuda130",
                      "nvidia-dali-cuda120", "typing-extensions"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist_name] = md.version(dist_name)
    if ctx.cuda:
        if not torch.cuda.is_available():
            raise CheckFailed("torch.cuda.is_available() is False", out)
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   bf16=torch.cuda.is_bf16_supported(),
                   cudnn=torch.backends.cudnn.version(), nccl=str(torch.cuda.nccl.version()),
                   device_count=torch.cuda.device_count())
        if not out["bf16"]:
            raise CheckFailed("no bf16 support", out)
    return out


@check("core", quick=True, timeout=60)
def cuda_index(ctx: Ctx) -> dict:
    """``hpckd.dist.cuda_index``: cuda:local_rank, or cuda:0 when a task sees one GPU; ``select_device`` on cuda."""
    import torch

    from hpckd.dist import cuda_index as index, select_device
    from hpckd.errors import UserError

    cases = {(0, 1): 0, (3, 1): 0, (1, 2): 1, (7, 8): 7}
    got = {f"{lr}/{vis}": index(lr, vis) for lr, vis in cases}
    bad = [k for (lr, vis), want in cases.items() for k in [f"{lr}/{vis}"] if got[k] != want]
    for lr, vis in ((2, 2), (0, 0)):
        try:
            index(lr, vis)
            bad.append(f"{lr}/{vis} accepted")
        except UserError:
            pass
    out = {"cases": got}
    if ctx.cuda:
        dev = select_device(0, "cuda")
        out.update(selected=str(dev), current_device=torch.cuda.current_device())
        if dev != torch.device("cuda", 0) or torch.cuda.current_device() != 0:
            bad.append(f"select_device gave {dev}")
    if bad:
        raise CheckFailed("; ".join(bad), out)
    return out


# Every training variant of this file, so that `config_overrides` can validate them all on any machine.
TRAIN_VARIANTS: dict[str, list[str]] = {
    "ddp_fp32": [],
    "ddp_fp32_foreach": ["optim.fused=false"],
    "ddp_bf16": ["train.precision=bf16"],
    "ddp_fp16": ["train.precision=fp16"],
    "ddp_bf16_cl_bf16images": ["train.precision=bf16", "train.channels_last=true", "data.dtype=bfloat16"],
    "ddp_sync_bn": ["dist.sync_bn=true", "train.precision=bf16"],
    "ddp_compile": ["train.compile=true", "train.precision=bf16", "train.channels_last=true"],
    "ddp_followup_randaugment": ["batch_ops.scheme=randaugment", "train.precision=bf16"],
    "ds_zero2_fp32": ["dist.backend=deepspeed", "dist.zero_stage=2"],
    "ds_zero1_bf16": ["dist.backend=deepspeed", "dist.zero_stage=1", "train.precision=bf16"],
    "ds_zero2_bf16_cl": ["dist.backend=deepspeed", "dist.zero_stage=2", "train.precision=bf16",
                         "train.channels_last=true"],
    "ds_zero0_fp16": ["dist.backend=deepspeed", "dist.zero_stage=0", "train.precision=fp16"],
    "ds_compile": ["dist.backend=deepspeed", "dist.zero_stage=1", "train.precision=bf16", "train.compile=true"],
    "dali_train": ["data.loader=dali", "aug=weak", "train.precision=bf16", "data.dtype=bfloat16",
                   "train.channels_last=true"],
    "distill": ["train.precision=bf16", "loss.name=ensemble_kd"],
    "distill_cutmix_pick": ["train.precision=bf16", "batch_ops.scheme=cutmix_pick"],
    "distill_dali_views": ["data.loader=dali", "aug=weak", "train.precision=bf16"],
}


@check("core", quick=True, timeout=120)
def config_overrides(ctx: Ctx) -> dict:
    """Every override set used by the training checks loads and validates (config-only), and the machine check
    rejects SyncBatchNorm on CPU with its one-line error."""
    import torch

    from hpckd.train.experiment import load_experiment
    from hpckd.errors import ConfigError
    from hpckd.train.options import check_runtime

    root = ctx.synth("small32")
    loaded, bad = 0, []
    for name, extra in TRAIN_VARIANTS.items():
        for device in ("cuda", "cpu"):
            args = [*TRAIN_BASE, f"data.root={root}", f"out_dir={ctx.work / 'x'}", f"dist.device={device}", *extra]
            try:
                load_experiment(None, args)
                loaded += 1
            except ConfigError as exc:
                bad.append(f"{name}/{device}: {exc}")
    try:
        check_runtime(load_experiment(None, [*TRAIN_BASE, "dist.sync_bn=true"]), torch.device("cpu"))
        bad.append("dist.sync_bn=true accepted on cpu")
    except ConfigError as exc:
        sync_bn_error = str(exc)
    if bad:
        raise CheckFailed("; ".join(bad), {"loaded": loaded})
    return {"loaded": loaded, "sync_bn_cpu_error": sync_bn_error}


@check("core", devices=("cuda",), timeout=180)
def nccl_world1_ddp(ctx: Ctx) -> dict:
    """An NCCL group of world size 1 (``hpckd.dist.ensure_process_group``): all_reduce, the exact int64
    all-reduce of the metrics over NCCL, and DDP(device_ids=[0]) whose gradients equal the unwrapped model's."""
    import torch
    import torch.distributed as tdist

    from hpckd import dist
    from hpckd.metrics.exact import all_reduce_int64
    from hpckd.models import create

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    dist.ensure_process_group(dev)
    try:
        backend = tdist.get_backend()
        t = torch.arange(4, dtype=torch.float32, device=dev)
        tdist.all_reduce(t)
        summed = all_reduce_int64({"a": torch.tensor([3, 4], dtype=torch.int64),
                                   "b": torch.tensor([5], dtype=torch.int64)})
        torch.manual_seed(0)
        model = create("resnet8", 10).to(dev)
        plain = copy.deepcopy(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
        x = torch.randn(16, 3, 32, 32, device=dev)
        y = torch.randint(0, 10, (16,), device=dev)
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        torch.nn.functional.cross_entropy(plain(x), y).backward()
        diff = max((a.grad - b.grad).abs().max().item() for a, b in zip(model.parameters(), plain.parameters()))
        out = {"backend": backend, "all_reduce": t.tolist(), "exact_sum": {k: v.tolist() for k, v in summed.items()},
               "exact_sum_device": str(summed["a"].device), "ddp_vs_plain_max_grad_diff": diff}
    finally:
        tdist.destroy_process_group()
    if backend != "nccl" or out["all_reduce"] != [0.0, 1.0, 2.0, 3.0] or out["exact_sum"] != {"a": [3, 4], "b": [5]}:
        raise CheckFailed("collectives on the world-1 NCCL group returned wrong values", out)
    if diff > 1e-5:
        raise CheckFailed(f"DDP gradients differ from the plain model's by {diff:g}", out)
    return out


@check("core", quick=True, timeout=180)
def dist_check_torchrun(ctx: Ctx) -> dict:
    """``hpckd dist-check`` under torchrun: 2 ranks on gloo (CPU), 1 rank on the GPU; and 2 ranks on one GPU
    (NCCL, both ranks -> cuda:0 via cuda_index): NCCL may refuse two ranks on one device, which is then a warning."""
    def launcher(n: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]

    # Rank 0 prints every rank's record (one line each); parse the records.
    record = re.compile(r"rank (\d+)/(\d+) launcher=(\S+) local_rank=\d+ device=(\S+) "
                        r"all_reduce=([0-9.]+) expected=([0-9.]+)")

    def ranks(text: str) -> list[dict]:
        return [{"rank": int(m[0]), "world": int(m[1]), "launcher": m[2], "device": m[3], "ok": m[4] == m[5]}
                for m in record.findall(text)]

    out, problems, status = {}, [], "pass"
    proc = ctx.hpckd(["dist-check", "--cpu"], "dist-check-gloo2", timeout=120, launcher=launcher(2))
    out["gloo_2"] = {"rc": proc.returncode, "ranks": ranks(proc.stdout)}
    if proc.returncode != 0 or len(out["gloo_2"]["ranks"]) != 2 or not all(r["ok"] for r in out["gloo_2"]["ranks"]):
        problems.append(f"gloo x2: rc {proc.returncode}: {last_line(proc.stderr)}")
    if ctx.cuda:
        proc = ctx.hpckd(["dist-check"], "dist-check-cuda1", timeout=120, launcher=launcher(1))
        out["cuda_1"] = {"rc": proc.returncode, "ranks": ranks(proc.stdout)}
        if proc.returncode != 0 or [r["device"] for r in out["cuda_1"]["ranks"]] != ["cuda:0"]:
            problems.append(f"cuda x1: rc {proc.returncode}: {last_line(proc.stderr)}")
        try:
            proc = ctx.hpckd(["dist-check"], "dist-check-cuda2", timeout=90, launcher=launcher(2))
            out["nccl_2_on_1_gpu"] = {"rc": proc.returncode, "ranks": ranks(proc.stdout),
                                      "error": "" if proc.returncode == 0 else last_line(proc.stderr)}
            if proc.returncode != 0:
                status = "warn"
        except subprocess.TimeoutExpired:
            out["nccl_2_on_1_gpu"] = {"rc": None, "error": "timed out after 90 s"}
            status = "warn"
    if problems:
        raise CheckFailed("; ".join(problems), out)
    out["status"] = status
    if status == "warn":
        out["note"] = "two ranks on one GPU did not run under NCCL (expected with NCCL's duplicate-GPU check)"
    return out


@check("core", quick=True, timeout=60)
def precision(ctx: Ctx) -> dict:
    """``hpckd.precision``: autocast dtypes on the device, GradScaler for fp16 only."""
    import torch

    from hpckd.precision import autocast, make_scaler

    dev = ctx.torch_device
    a, b = torch.randn(64, 64, device=dev), torch.randn(64, 64, device=dev)
    got = {}
    for p in ("fp32", "bf16") + (("fp16",) if ctx.cuda else ()):
        with autocast(p, dev):
            got[p] = str((a @ b).dtype)
    scaler = make_scaler("fp16", dev)
    out = {"matmul_dtype": got, "fp16_scaler": type(scaler).__name__ if scaler is not None else None,
           "bf16_scaler": make_scaler("bf16", dev)}
    want = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}
    if any(got[p] != want[p] for p in got) or scaler is None or out["bf16_scaler"] is not None:
        raise CheckFailed(f"unexpected autocast/scaler behaviour: {out}", out)
    return out


def _teacher_models(seed: int = 0):
    import torch

    from hpckd.models import create

    torch.manual_seed(seed)
    models = [create("resnet8", 10), create("resnet20", 10)]
    for m in models:  # non-trivial BatchNorm statistics, so eval mode matters
        m.train()
        with torch.no_grad():
            for _ in range(3):
                m(torch.randn(32, 3, 32, 32))
    return models


@check("core", quick=True, timeout=180)
def serving(ctx: Ctx) -> dict:
    """``TeacherSet`` on the device (CUDA: bf16 autocast + channels-last weights and inputs) against the same
    teachers in fp32 on the CPU: close logits, same top-1, fp32 output usable in autograd, eval mode kept."""
    import torch

    from hpckd.data.batch import Batch
    from hpckd.teachers.serving import ServingConfig, TeacherSet

    models = _teacher_models()
    reference = [copy.deepcopy(m).eval() for m in models]
    dev = ctx.torch_device
    ts = TeacherSet.from_models(models, dev, ServingConfig())
    x = torch.randn(64, 3, 32, 32)
    batch = Batch(views={"student": x.to(dev)}, labels=torch.zeros(64, dtype=torch.int64, device=dev),
                  index=torch.arange(64, device=dev))
    models[0].train()  # serving must put it back in eval mode
    logits = ts(batch)
    with torch.no_grad():
        ref = [m(x) for m in reference]
    out: dict[str, Any] = {"dtype": str(logits[0].dtype), "device": str(logits[0].device)}
    diffs, agree = [], []
    for got, want in zip(logits, ref):
        got = got.detach().float().cpu()
        diffs.append((got - want).abs().max().item() / max(want.abs().max().item(), 1e-6))
        agree.append((got.argmax(1) == want.argmax(1)).float().mean().item())
    out.update(max_rel_diff=[round(d, 5) for d in diffs], top1_agreement=agree)
    if ctx.cuda:
        w = next(p for p in ts._runners[0].parameters() if p.dim() == 4)
        out["weights_channels_last"] = bool(w.is_contiguous(memory_format=torch.channels_last))
    student = torch.randn(64, 10, device=dev, requires_grad=True)
    (student * logits[0]).sum().backward()
    out["autograd_ok"] = student.grad is not None
    problems = []
    if out["dtype"] != "torch.float32" or not out["device"].startswith(dev.type):
        problems.append(f"logits {out['dtype']} on {out['device']}")
    tol = 0.05 if ctx.cuda else 1e-5  # bf16 autocast vs fp32
    if max(diffs) > tol:
        problems.append(f"logits differ from the fp32 reference by {max(diffs):.4f} (relative) > {tol}")
    if not ctx.cuda and min(agree) < 1.0:
        problems.append(f"top-1 agreement {min(agree):.3f}")
    if ctx.cuda and not out["weights_channels_last"]:
        problems.append("teacher weights not channels-last on CUDA")
    if models[0].training:
        problems.append("teacher left in training mode")
    if problems:
        raise CheckFailed("; ".join(problems), out)
    if min(agree) < 0.9:  # random-init teachers have near ties, which bf16 may flip
        out.update(status="warn", note=f"top-1 agreement with the fp32 reference {min(agree):.3f} < 0.9")
    return out


@check("core", devices=("cuda",), timeout=360)
def serving_compile(ctx: Ctx) -> dict:
    """``serving.compile=true`` (inductor) gives the same logits as the eager teachers (both bf16 autocast)."""
    import torch

    from hpckd.data.batch import Batch
    from hpckd.teachers.serving import ServingConfig, TeacherSet

    dev = ctx.torch_device
    eager = TeacherSet.from_models(_teacher_models(), dev, ServingConfig())
    t0 = time.time()
    compiled = TeacherSet.from_models(_teacher_models(), dev, ServingConfig(compile=True))
    x = torch.randn(64, 3, 32, 32, device=dev)
    batch = Batch(views={"student": x}, labels=torch.zeros(64, dtype=torch.int64, device=dev),
                  index=torch.arange(64, device=dev))
    a, b = eager(batch), compiled(batch)
    first_s = time.time() - t0
    t1 = time.time()
    for _ in range(5):
        compiled(batch)
    torch.cuda.synchronize()
    diffs = [((p - q).abs().max() / q.abs().max().clamp_min(1e-6)).item() for p, q in zip(b, a)]
    out = {"max_rel_diff": diffs, "compile_and_first_call_s": round(first_s, 1),
           "steady_call_ms": round((time.time() - t1) / 5 * 1000, 2)}
    if max(diffs) > 0.03:
        raise CheckFailed(f"compiled teachers differ by {max(diffs):.4f} (relative)", out)
    return out


def _train_check(name: str, devices=("cuda", "cpu"), quick=False, timeout=300, expect=None, doc="", group="core"):
    def fn(ctx: Ctx) -> dict:
        if name.startswith("ds_"):
            need_deepspeed()
        if name.startswith("dali"):
            need_dali()
        env = {"DS_ACCELERATOR": "cpu"} if (name.startswith("ds_") and not ctx.cuda) else None
        return ctx.train(name, TRAIN_VARIANTS[name], expect=expect, timeout=timeout - 10, env=env)
    fn.__name__ = f"train_{name}"
    fn.__doc__ = doc
    return check(group, devices=devices, quick=quick, timeout=timeout)(fn)


_train_check("ddp_fp32", quick=True, expect={"backend": "ddp", "precision": "fp32", "world_size": 1},
             doc="hpckd train, fp32, one process (no DDP wrapper for world size 1).")
_train_check("ddp_bf16", quick=True, expect={"precision": "bf16"}, doc="bf16 autocast (fp32 params, logits cast back).")
_train_check("ddp_fp16", devices=("cuda",), expect={"precision": "fp16"}, doc="fp16 autocast + GradScaler.")
_train_check("ddp_bf16_cl_bf16images", devices=("cuda",),
             doc="channels-last weights and inputs, bf16 images from the loader.")
_train_check("ddp_sync_bn", devices=("cuda",),
             doc="dist.sync_bn=true (SyncBatchNorm; world size 1 takes its non-syncing path).")
_train_check("ddp_compile", devices=("cuda",), timeout=480,
             doc="train.compile=true (inductor) with bf16 + channels-last.")
_train_check("ddp_followup_randaugment",
             doc="batch_ops.scheme=randaugment: the doubled batch's RandAugment rendered on the device.")


@check("core", quick=True, timeout=120)
def sync_bn_rejected_on_cpu(ctx: Ctx) -> dict:
    """The CLI turns dist.sync_bn=true on CPU into one line (SyncBatchNorm does not run on CPU)."""
    args = ctx.train_args("sync_bn_cpu", ["dist.device=cpu", "dist.sync_bn=true"])
    proc = ctx.hpckd(args, "sync_bn_cpu", timeout=110)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    out = {"rc": proc.returncode, "stderr": lines[-3:]}
    if proc.returncode == 0 or len(lines) != 1 or "sync_bn" not in lines[0] or "Traceback" in proc.stderr:
        raise CheckFailed("expected a one-line hpckd error", out)
    return out


@check("core", quick=True, timeout=480)
def distill_inline_teachers(ctx: Ctx) -> dict:
    """hpckd distill from the fp32 and bf16 teachers (inline serving: bf16 autocast + channels-last on CUDA)."""
    config = ctx.distill_config(ctx.teachers())
    return ctx.train("distill", TRAIN_VARIANTS["distill"], mode="distill", config=config, timeout=420)


@check("core", devices=("cuda",), timeout=420)
def distill_cutmix_pick(ctx: Ctx) -> dict:
    """Distillation with CutMixPick: CutMix pool on the device, scored by the teachers under autocast."""
    config = ctx.distill_config(ctx.teachers())
    return ctx.train("distill_cutmix_pick", TRAIN_VARIANTS["distill_cutmix_pick"], mode="distill", config=config,
                     timeout=400)


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


@contextlib.contextmanager
def _counting_syncs(cuda: bool):
    """Yields a list that grows by one entry per host sync. CUDA: torch's sync debug mode (every synchronising
    call warns: .item(), .cpu(), blocking copies, nonzero ...). CPU: the torch methods that read a tensor on the
    host (tests/test_hotpath.py's accounting), so the kit's CPU run checks the same loop."""
    import warnings

    import torch

    calls: list[str] = []
    if cuda:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield caught
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name, original):
        def counted(tensor, *args, **kwargs):
            calls.append(name)
            return original(tensor, *args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@check("core", quick=True, timeout=480)
def hotpath_syncs(ctx: Ctx) -> dict:
    """Host syncs per micro-step of the real loop between its check points (one epoch, no logging or step
    checkpoints: the check points are micro-step 1 and the epoch's last): must be 0 for teacher training, inline
    distillation from 2 teachers with CutMix or CutMixPick, and distillation from a logit store with CutMix or
    CutMixPick. On CUDA counted by
    torch.cuda.set_sync_debug_mode (not on CPU: there the host reads of tensors are counted)."""
    from hpckd.train import engine
    from hpckd.train.experiment import load_experiment

    teachers = ctx.teachers()
    config = ctx.distill_config(teachers)
    store = ctx.work / "runs" / f"hotpath-store-{ctx.device}"
    mix = ["batch_ops.scheme=cutmix", "loss.name=ensemble_kd", "train.precision=bf16"]
    common = ["optim.epochs=1", "log_every=0", "train.checkpoint_every=0"]
    pick = [*mix[1:], "batch_ops.scheme=cutmix_pick"]
    pick_store = ctx.work / "runs" / f"hotpath-pick-store-{ctx.device}"
    cases = {"train": (None, "train", []), "inline_cutmix": (config, "distill", mix),
             "cached_cutmix": (config, "distill", [*mix, "serving.mode=cached", f"serving.store={store}"]),
             "inline_cutmix_pick": (config, "distill", pick),
             "cached_cutmix_pick": (config, "distill", [*pick, "serving.mode=cached", f"serving.store={pick_store}"])}
    for folder, ops in ((store, mix), (pick_store, pick)):
        shutil.rmtree(folder, ignore_errors=True)
        args = ["teachers", "cache", str(config), *TRAIN_BASE, f"data.root={ctx.synth('small32')}",
                f"dist.device={ctx.device}", f"out_dir={ctx.run_dir('hotpath_cache')}", *ops, *common,
                "--out", str(folder)]
        proc = ctx.hpckd(args, f"hotpath-cache-{folder.name}", timeout=200)
        if proc.returncode != 0:
            raise CheckFailed(f"hpckd teachers cache exited {proc.returncode}: {last_line(proc.stderr or proc.stdout)}")
    out: dict[str, Any] = {"counted_by": "torch.cuda.set_sync_debug_mode" if ctx.cuda else "torch.Tensor host reads"}
    for name, (cfg_path, mode, extra) in cases.items():
        args = [*ctx.train_args(f"hotpath_{name}", [*extra, *common], mode)[1:]]
        cfg = load_experiment(str(cfg_path) if cfg_path else None, args)
        shutil.rmtree(ctx.run_dir(f"hotpath_{name}"), ignore_errors=True)
        marks: list[int] = []
        with _counting_syncs(ctx.cuda) as calls:
            engine.run(cfg, mode=mode, hooks=[lambda _c, calls=calls: marks.append(len(calls))])
        per_micro = [b - a for a, b in zip(marks, marks[1:])]
        out[name] = {"micro_steps": len(marks), "syncs_per_micro_step": per_micro}
    bad = {k: v["syncs_per_micro_step"][1:] for k, v in out.items() if isinstance(v, dict)
           and any(v["syncs_per_micro_step"][1:])}
    if bad:
        raise CheckFailed(f"host syncs between check points: {bad}", out)
    return out


# ================================================================================================ deepspeed


@check("deepspeed", quick=True, timeout=480)
def train_ds_zero2_fp32(ctx: Ctx) -> dict:
    """DeepSpeed ZeRO-2 fp32 (NCCL group of 1 on CUDA) against DDP fp32 (foreach SGD) on the same job: same trajectory (bit for
    bit on CPU, as the CPU tests show; within cuDNN's non-determinism on CUDA)."""
    need_deepspeed()
    env = None if ctx.cuda else {"DS_ACCELERATOR": "cpu"}
    out = ctx.train("ds_zero2_fp32", TRAIN_VARIANTS["ds_zero2_fp32"], expect={"backend": "deepspeed"}, env=env,
                    timeout=440)
    # The DDP reference with foreach SGD, the kernel DeepSpeed's step runs (hpckd never fuses it), so the two can
    # agree bit for bit; ddp_fp32 itself runs the fused SGD of the finite-step gate.
    ref_path = ctx.run_dir("ddp_fp32_foreach") / "results.json"
    if not ref_path.is_file():
        saved = dict(ctx.numbers)
        ctx.train("ddp_fp32_foreach", TRAIN_VARIANTS["ddp_fp32_foreach"])
        ctx.numbers = saved
    ref = json.loads(ref_path.read_text())
    ds = json.loads((ctx.run_dir("ds_zero2_fp32") / "results.json").read_text())
    rel = [abs(a["train_loss"] - b["train_loss"]) / max(abs(b["train_loss"]), 1e-9)
           for a, b in zip(ds["history"], ref["history"])]
    out.update(ddp_history_max_rel_diff=max(rel), ddp_accuracy=ref["metrics"]["accuracy"],
               identical_to_ddp=ds["history"] == ref["history"])
    if not ctx.cuda and not out["identical_to_ddp"]:
        raise CheckFailed("on CPU ZeRO-2 fp32 should repeat DDP fp32 bit for bit", out)
    if max(rel) > 0.05:
        out["status"] = "warn"
        out["note"] = f"epoch training losses differ from DDP's by up to {max(rel):.1%}"
    return out


_train_check("ds_zero1_bf16", devices=("cuda",), group="deepspeed", timeout=300,
             expect={"backend": "deepspeed", "precision": "bf16"},
             doc="ZeRO-1 with DeepSpeed's torch_autocast bf16 (fp32 BatchNorm buffers).")
_train_check("ds_zero2_bf16_cl", devices=("cuda",), group="deepspeed", timeout=300,
             doc="ZeRO-2 bf16 with channels-last inputs (DeepSpeed keeps contiguous weights).")
_train_check("ds_zero0_fp16", devices=("cuda",), group="deepspeed", timeout=300, expect={"precision": "fp16"},
             doc="ZeRO-0 fp16 (DeepSpeed's autocast loss scaler).")
_train_check("ds_compile", devices=("cuda",), group="deepspeed", timeout=480,
             doc="DeepSpeed engine.compile() (ZeRO-1, bf16).")


# ================================================================================================ dali


def _array_source(files: list[str]):
    """The images of ``files`` decoded by PIL into an ArraySource (raw pixels: no decoder in the comparison)."""
    import numpy as np
    from PIL import Image

    from hpckd.data.sources import ArraySource

    return ArraySource(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]), label="raw")


def _dali_batches(source, labels, policy, device, seed: int = 7, batches: int = 2, batch: int = 16, threads: int = 4):
    """The first ``batches`` batches of epoch 0 of a DaliLoader: (index, images float32 CPU, params, devices)."""
    import torch

    from hpckd.data.dali import DaliLoader, ShardSpec

    loader = DaliLoader(source, labels, {"student": policy}, batch_size=batch, shard=ShardSpec(), train=True, seed=seed,
                        num_threads=threads, device=device, mean=MEAN, std=STD)
    loader.set_epoch(0)
    out, it = [], iter(loader)
    try:
        for _ in range(batches):
            b = next(it)
            view = b.views["student"]
            params = {k: torch.as_tensor(v).cpu() for k, v in b.aug["student"].items()}
            out.append({"index": b.index.cpu(), "x": view.float().cpu(), "params": params, "x_device": str(view.device),
                        "labels_device": str(b.labels.device), "shape": tuple(view.shape), "dtype": str(view.dtype)})
    finally:
        it.close()
    del loader
    return out


def _grey_diff(a, b) -> dict:
    """Differences of two normalised image batches in 8-bit grey levels."""
    import torch

    scale = torch.tensor(STD).view(1, 3, 1, 1) * 255.0
    d = ((a - b).abs() * scale).flatten()
    p99 = torch.quantile(d[:: max(1, d.numel() // 1_000_000)], 0.99).item()  # quantile's size limit: subsample
    return {"mean": round(d.mean().item(), 3), "p99": round(p99, 2), "max": round(d.max().item(), 2),
            "frac_gt_16": round((d > 16).float().mean().item(), 5)}


def _compare(name: str, first: list[dict], second: list[dict], mean_tol: float,
             frac_tol: float) -> tuple[dict, list[str], list[str]]:
    """(numbers, failures, warnings) of two loaders' batches: same ids and parameters, close pixels."""
    import torch

    problems, warnings = [], []
    for a, b in zip(first, second):
        if not torch.equal(a["index"], b["index"]):
            problems.append(f"{name}: different sample ids")
        if set(a["params"]) != set(b["params"]):
            problems.append(f"{name}: parameter fields {sorted(a['params'])} vs {sorted(b['params'])}")
        for k in set(a["params"]) & set(b["params"]):
            pa, pb = a["params"][k].double().reshape(-1), b["params"][k].double().reshape(-1)
            if pa.shape != pb.shape or not torch.equal(pa, pb):
                problems.append(f"{name}: parameter {k} differs")
    problems = list(dict.fromkeys(problems))
    diff = _grey_diff(torch.cat([a["x"] for a in first]), torch.cat([b["x"] for b in second]))
    if diff["mean"] > 4 * mean_tol or diff["frac_gt_16"] > 4 * frac_tol:
        problems.append(f"{name}: pixels differ (mean {diff['mean']} grey levels, {diff['frac_gt_16']:.2%} > 16)")
    elif diff["mean"] > mean_tol or diff["frac_gt_16"] > frac_tol:
        warnings.append(f"{name}: mean {diff['mean']} grey levels, {diff['frac_gt_16']:.2%} > 16 "
                        f"(tolerance {mean_tol}, {frac_tol:.0%})")
    return diff, problems, warnings


def _loaded_libraries() -> list[str]:
    wanted = re.compile(r"nvjpeg|nvimgcodec|libnpp|libcufft|libnvcomp|libdali\.so")
    with open("/proc/self/maps") as maps:
        return sorted({line.split()[-1] for line in maps if wanted.search(line)})


def _policies():
    from hpckd.data.aug import Policy, scheme_policy, train_policy

    return {
        "imagenet_weak": ("jpeg375", train_policy("imagenet", "weak", 224), 16),
        "imagenet_strong": ("jpeg375", train_policy("imagenet", "strong", 224), 16),
        "imagenet_autoaugment": ("jpeg375", scheme_policy("autoaugment", "imagenet", 224), 16),
        "trivialaugment": ("jpeg375", Policy(name="trivial", size=160, crop="rrc", flip=True, auto="trivialaugment"),
                           16),
        "cifar_weak": ("cifar32", train_policy("cifar", "weak", 32), 32),
        "cifar_strong": ("cifar32", train_policy("cifar", "strong", 32), 32),
    }


def _dali_gpu_vs_cpu(policy_name: str):
    def fn(ctx: Ctx) -> dict:
        import torch

        from hpckd.data.index import build_index

        need_dali()
        data, policy, batch = _policies()[policy_name]
        index = build_index(ctx.synth(data) / "train", cache="off")
        out: dict[str, Any] = {"policy": repr(policy)}
        problems, warnings = [], []
        gpu = ctx.torch_device  # on --device cpu: CPU against CPU, a smoke run of this comparison (must be exact)
        if not ctx.cuda:
            out["note_cpu"] = "CPU vs CPU smoke run: the GPU comparison itself needs --device cuda"
        for kind, source, mean_tol, frac_tol in (("encoded", index.files, 4.0, 0.05),
                                                 ("raw", _array_source(index.files), 1.5, 0.02)):
            t0 = time.time()
            on_gpu = _dali_batches(source, index.labels, policy, gpu, batch=batch)
            t1 = time.time()
            on_cpu = _dali_batches(source, index.labels, policy, torch.device("cpu"), batch=batch)
            diff, p, w = _compare(kind, on_gpu, on_cpu, mean_tol, frac_tol)
            problems += p
            warnings += w
            first = on_gpu[0]
            out[kind] = {"grey_level_diff": diff, "gpu_build_and_2_batches_s": round(t1 - t0, 1),
                         "cpu_build_and_2_batches_s": round(time.time() - t1, 1)}
            if not ctx.cuda and diff["max"] != 0:
                problems.append(f"{kind}: two CPU runs differ")
            if ctx.cuda and (first["x_device"] != "cuda:0" or first["labels_device"] != "cuda:0"):
                problems.append(f"{kind}: images on {first['x_device']}, labels on {first['labels_device']}")
            if first["shape"] != (batch, 3, policy.size, policy.size) or first["dtype"] != "torch.float32":
                problems.append(f"{kind}: batch {first['shape']} {first['dtype']}")
        out["loaded_libraries"] = _loaded_libraries()
        if problems:
            raise CheckFailed("; ".join(problems), out)
        if warnings:
            out.update(status="warn", note="; ".join(warnings))
        return out

    fn.__name__ = f"dali_gpu_vs_cpu_{policy_name}"
    fn.__doc__ = (f"DaliLoader on cuda:0 vs on the CPU, policy {policy_name}: same ids and parameters; pixels within "
                  "tolerance for encoded JPEGs (nvJPEG vs libjpeg) and for raw pixels (GPU vs CPU operators only).")
    return check("dali", timeout=300, smoke=True, quick=policy_name == "imagenet_strong")(fn)


for _name in ("imagenet_weak", "imagenet_strong", "imagenet_autoaugment", "trivialaugment", "cifar_weak",
              "cifar_strong"):
    _dali_gpu_vs_cpu(_name)


@check("dali", timeout=240, smoke=True, quick=True)
def dali_jitter_gpu_branch(ctx: Ctx) -> dict:
    """The ``_jitter`` GPU branch (GPU arithmetic about the grey mean) against the CPU's fn.brightness_contrast,
    on raw pixels with resize + jitter only; and the jitter must change the image (vs resize only)."""
    import torch

    from hpckd.data.aug import Policy
    from hpckd.data.index import build_index

    need_dali()
    index = build_index(ctx.synth("jpeg375") / "train", cache="off")
    source = _array_source(index.files)
    jitter = Policy(name="jitter_only", size=128, crop="resize", jitter=0.4)
    plain = Policy(name="resize_only", size=128, crop="resize")
    gpu, cpu = ctx.torch_device, torch.device("cpu")  # on --device cpu: CPU vs CPU (smoke run)
    g, c = _dali_batches(source, index.labels, jitter, gpu), _dali_batches(source, index.labels, jitter, cpu)
    diff, problems, warnings = _compare("jitter gpu vs cpu", g, c, mean_tol=1.0, frac_tol=0.01)
    unjittered = _dali_batches(source, index.labels, plain, gpu)
    effect = _grey_diff(torch.cat([b["x"] for b in g]), torch.cat([b["x"] for b in unjittered]))
    out = {"gpu_vs_cpu": diff, "jitter_effect": effect}
    if effect["mean"] < 3:
        problems.append(f"jitter changed the images by only {effect['mean']} grey levels on average")
    if problems:
        raise CheckFailed("; ".join(problems), out)
    if warnings:
        out.update(status="warn", note="; ".join(warnings))
    return out


@check("dali", quick=True, timeout=300)
def dali_determinism(ctx: Ctx) -> dict:
    """Same seed, same batch (ids, parameters, pixels) on the device; another seed, another batch."""
    import torch

    from hpckd.data.aug import train_policy
    from hpckd.data.index import build_index

    need_dali()
    index = build_index(ctx.synth("jpeg375") / "train", cache="off")
    policy = train_policy("imagenet", "strong", 128)
    dev = ctx.torch_device
    a = _dali_batches(index.files, index.labels, policy, dev, seed=3)
    b = _dali_batches(index.files, index.labels, policy, dev, seed=3)
    c = _dali_batches(index.files, index.labels, policy, dev, seed=4)
    same = all(torch.equal(x["x"], y["x"]) and torch.equal(x["index"], y["index"]) for x, y in zip(a, b))
    other = not all(torch.equal(x["index"], y["index"]) for x, y in zip(a, c))
    out = {"same_seed_identical": same, "other_seed_differs": other,
           "same_seed_diff": _grey_diff(torch.cat([x["x"] for x in a]), torch.cat([y["x"] for y in b]))}
    if not other:
        raise CheckFailed("a different seed gave the same batches", out)
    if not same:
        if out["same_seed_diff"]["max"] > 1.0:
            raise CheckFailed("same seed, different pixels", out)
        out.update(status="warn", note="same seed: not bit-identical (sub-grey-level differences)")
    return out


@check("dali", quick=True, timeout=300)
def dali_vs_torch_render(ctx: Ctx) -> dict:
    """DaliLoader vs TorchLoader (torchvision-v2 renderer) on the device, same seed: identical ids and parameters;
    pixel differences reported (same meaning, not the same pixels: informative, warns only beyond 12 levels)."""
    import torch

    from hpckd.data.aug import train_policy
    from hpckd.data.index import build_index
    from hpckd.data.sharding import ShardSpec
    from hpckd.data.torch_loader import TorchLoader

    need_dali()
    index = build_index(ctx.synth("jpeg375") / "train", cache="off")
    out, problems = {}, []
    for strength in ("weak", "strong"):
        policy = train_policy("imagenet", strength, 160)
        dali = _dali_batches(index.files, index.labels, policy, ctx.torch_device, seed=5)
        loader = TorchLoader(index.files, index.labels, {"student": policy}, batch_size=16, shard=ShardSpec(),
                             train=True, seed=5, num_threads=2, device=ctx.torch_device, mean=MEAN, std=STD)
        loader.set_epoch(0)
        it = iter(loader)
        tv = []
        for _ in range(2):
            bt = next(it)
            tv.append({"index": bt.index.cpu(), "x": bt.views["student"].float().cpu(),
                       "params": {k: torch.as_tensor(v).cpu() for k, v in bt.aug["student"].items()}})
        del it, loader
        diff, p, _ = _compare(strength, dali, tv, mean_tol=12.0, frac_tol=0.5)
        out[strength] = diff
        problems += [x for x in p if "pixels differ" not in x]
    if problems:
        raise CheckFailed("; ".join(problems), out)
    if max(out[s]["mean"] for s in out) > 12:
        out.update(status="warn", note="DALI and the torch renderer differ by more than 12 grey levels on average")
    return out


@check("dali", quick=True, timeout=420)
def train_dali(ctx: Ctx) -> dict:
    """hpckd train with data.loader=dali, aug=weak (GPU augmentation on CUDA), bf16 images, channels-last."""
    need_dali()
    extra = TRAIN_VARIANTS["dali_train"]
    if not ctx.cuda:
        extra = ["data.loader=dali", "aug=weak"]
    return ctx.train("dali_train", extra, timeout=400)


@check("dali", devices=("cuda",), timeout=480)
def distill_dali_views(ctx: Ctx) -> dict:
    """Distillation with DALI on the GPU and per-teacher views (teacher 1 sees its own strong view): three views
    rendered in one DALI pipeline."""
    need_dali()
    config = ctx.distill_config(ctx.teachers(), [None, "strong"])
    return ctx.train("distill_dali_views", TRAIN_VARIANTS["distill_dali_views"], mode="distill", config=config,
                     timeout=440)


# ================================================================================================ driver


def run_child(name: str, device: str, work: Path, quick: bool, result: Path) -> int:
    """Run one check in this process and write its result (the parent runs each check as such a child)."""
    ctx = Ctx(device, work, quick)
    spec = REGISTRY[name]
    t0 = time.time()
    record: dict[str, Any] = {"name": name}
    try:
        numbers = spec.fn(ctx) or {}
        record["status"] = numbers.pop("status", "pass")
        if "note" in numbers:
            record["note"] = numbers.pop("note")
        record["numbers"] = {**ctx.numbers, **numbers}
    except Unavailable as exc:
        record.update(status="skip", note=str(exc))
    except CheckFailed as exc:
        record.update(status="fail", error=str(exc), numbers={**ctx.numbers, **exc.numbers})
    except subprocess.TimeoutExpired as exc:
        record.update(status="fail", error=f"timed out: {' '.join(map(str, exc.cmd))[-200:]}", numbers=ctx.numbers)
    except BaseException as exc:  # noqa: BLE001  the report must say what broke, whatever it was
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        record.update(status="fail", error=last_line("".join(tb)), where=last_frames(exc), numbers=ctx.numbers)
    record["seconds"] = round(time.time() - t0, 1)
    result.write_text(json.dumps(record, default=str))
    return 0


def last_frames(exc: BaseException) -> list[str]:
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    return [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames]


# Run order inside a group when it differs from the order of definition: what a call's budget may cut goes last
# (the compile checks and the informative ones), end-to-end DALI training comes early.
LATE = ("dist_check_torchrun", "serving_compile", "train_ddp_compile", "train_ds_compile", "dali_vs_torch_render",
        "distill_dali_views")
EARLY = ("dali_gpu_vs_cpu_imagenet_weak", "dali_gpu_vs_cpu_imagenet_strong", "train_dali")


def selected(args) -> list[Check]:
    names = sorted(REGISTRY, key=lambda n: (GROUPS.index(REGISTRY[n].group),
                                            0 if n in EARLY else 2 + LATE.index(n) if n in LATE else 1))
    if args.only:
        unknown = set(args.only) - set(names)
        if unknown:
            sys.exit(f"unknown check(s): {', '.join(sorted(unknown))}; --list shows them")
        names = [n for n in names if n in args.only]
    if args.groups:
        names = [n for n in names if REGISTRY[n].group in args.groups]
    return [REGISTRY[n] for n in names]


def meta(args) -> dict:
    info = {"device": args.device, "quick": args.quick, "groups": args.groups or list(GROUPS), "host": platform.node(),
            "python": platform.python_version(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "work": str(args.work)}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001
        info["torch"] = f"import failed: {exc}"
    return info


def write_report(path: Path, report: dict) -> None:
    counts: dict[str, int] = {}
    for r in report["checks"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    report["summary"] = counts
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(path)


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: it and what it started, nothing else


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="only the checks marked quick (the CPU-runnable subset)")
    p.add_argument("--groups", default="", help=f"comma-separated subset of {', '.join(GROUPS)}")
    p.add_argument("--only", default="", help="comma-separated check names")
    p.add_argument("--out", default="gpu_checks.json")
    p.add_argument("--work", default="", help="work folder (data, runs); default: $TMPDIR/hpckd-gpu-checks-DEVICE")
    p.add_argument("--budget-s", type=float, default=0, help="start no check after this many seconds (0: no limit)")
    p.add_argument("--keep-work", action="store_true", help="(with the default work folder) keep it afterwards")
    p.add_argument("--list", action="store_true")
    p.add_argument("--_child", default="", help=argparse.SUPPRESS)
    p.add_argument("--_result", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.groups = [g for g in args.groups.split(",") if g]
    args.only = [n for n in args.only.split(",") if n]
    bad_groups = set(args.groups) - set(GROUPS)
    if bad_groups:
        sys.exit(f"unknown group(s) {', '.join(sorted(bad_groups))}; choose from {', '.join(GROUPS)}")
    if args.list:
        for c in REGISTRY.values():
            where = "GPU only" if len(c.devices) == 1 else "GPU/smoke" if c.smoke else "cuda+cpu"
            first = c.doc.splitlines()[0] if c.doc else ""
            print(f"{c.group:10s} {c.name:40s} {where:9s} {'quick' if c.quick else '     '} {c.timeout:4.0f}s  {first}")
        return 0
    default_work = not args.work
    work = Path(args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"hpckd-gpu-checks-{args.device}").resolve()
    args.work = work
    work.mkdir(parents=True, exist_ok=True)
    if args._child:
        return run_child(args._child, args.device, work, args.quick, Path(args._result))

    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta(args), "checks": []}
    t_start = time.time()
    for spec in selected(args):
        base = {"name": spec.name, "group": spec.group, "gpu_only": spec.devices == ("cuda",) or spec.smoke}
        if spec.smoke and args.device == "cpu":
            base["cpu_smoke"] = "GPU check: on --device cpu only its code runs, CPU against CPU"
        if args.device not in spec.devices:
            report["checks"].append({**base, "status": "not_run", "note": "GPU only: not run on CPU"})
            continue
        if args.quick and not spec.quick:
            report["checks"].append({**base, "status": "not_run", "note": "not in --quick"})
            continue
        timeout = spec.timeout
        if args.budget_s:
            remaining = args.budget_s - (time.time() - t_start)
            if remaining < 20:
                report["checks"].append({**base, "status": "not_run", "note": f"over --budget-s {args.budget_s:.0f}"})
                write_report(out, report)
                continue
            timeout = min(timeout, remaining + 30)
        result = work / "results" / f"{spec.name}.json"
        result.parent.mkdir(parents=True, exist_ok=True)
        result.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--work", str(work),
               "--_child", spec.name, "--_result", str(result)] + (["--quick"] if args.quick else [])
        print(f"[{time.time() - t_start:6.0f}s] {spec.name} ...", flush=True)
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            output, _ = proc.communicate()
            cut = "" if timeout == spec.timeout else f" (cut short by --budget-s {args.budget_s:.0f})"
            record = {"status": "fail", "error": f"timed out after {timeout:.0f} s{cut}"}
        else:
            if result.is_file():
                record = json.loads(result.read_text())
            else:
                record = {"status": "fail",
                          "error": f"check process died (exit {proc.returncode}): {last_line(output)}"}
        kill_group(proc)  # anything it left running
        record = {**base, **{k: v for k, v in record.items() if k != "name"}, "seconds": round(time.time() - t0, 1)}
        (work / "results" / f"{spec.name}.log").write_text(output or "")
        report["checks"].append(record)
        write_report(out, report)
        shown = record.get("error") or record.get("note") or ""
        print(f"[{time.time() - t_start:6.0f}s] {spec.name}: {record['status'].upper()} ({record['seconds']} s) "
              f"{shown[:200]}", flush=True)
    report["meta"]["total_s"] = round(time.time() - t_start, 1)
    write_report(out, report)
    print(f"\n{len(report['checks'])} checks: " + ", ".join(f"{v} {k}" for k, v in sorted(report["summary"].items()))
          + f" -> {out}")
    if default_work and not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if report["summary"].get("fail") else 0


if __name__ == "__main__":
    sys.exit(main())
