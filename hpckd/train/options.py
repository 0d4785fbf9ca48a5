"""Static checks of the training options (``optim``, ``dist``, ``train``, ``resume``), run when a config loads.

Everything that can be judged from the config alone fails here, in the launching process, as one line; checks
that need the machine (SyncBatchNorm without a GPU, TensorBoard not installed, the world size) run in
:func:`check_runtime` once the process group exists.
"""

from __future__ import annotations

import importlib.util
import signal

import torch

from hpckd.config.checks import at_least, choose, positive, within
from hpckd.errors import ConfigError
from hpckd.precision import PRECISIONS

ZERO_STAGES = (0, 1, 2)
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "multistep", "constant")
BACKENDS = ("ddp", "deepspeed")
DEVICES = ("auto", "cpu", "cuda")
RESUME_WORDS = ("auto", "never")
# Reduced-precision images must match the autocast dtype: the first layer's weights are fp32 outside autocast.
_PRECISION_OF_DTYPE = {"bfloat16": "bf16", "float16": "fp16"}


def check_options(cfg) -> None:
    """Raise :class:`ConfigError` for inconsistent training options (config-only checks)."""
    optim, dist, train = cfg.optim, cfg.dist, cfg.train
    choose("optim.name", optim.name, OPTIMIZERS)
    choose("optim.schedule", optim.schedule, SCHEDULES)
    choose("dist.backend", dist.backend, BACKENDS)
    choose("dist.device", dist.device, DEVICES)
    choose("train.precision", train.precision, PRECISIONS)
    check_numbers(cfg)
    check_image_dtype(cfg)
    check_resume(cfg.resume)
    if optim.accum_steps < 1:
        raise ConfigError(f"config: 'optim.accum_steps' is {optim.accum_steps}; use 1 (no accumulation) or more")
    if cfg.data.batch_size % optim.accum_steps:
        raise ConfigError(f"config: data.batch_size={cfg.data.batch_size} is not divisible by optim.accum_steps="
                          f"{optim.accum_steps} (the global batch is split into accum_steps micro-batches)")
    if optim.step_factors and len(optim.step_factors) != len(optim.milestones):
        raise ConfigError(f"config: 'optim.step_factors' has {len(optim.step_factors)} entries but 'optim.milestones' "
                          f"has {len(optim.milestones)}; give one LR factor per milestone")
    if list(optim.milestones) != sorted(optim.milestones):
        raise ConfigError(f"config: 'optim.milestones' must be increasing, got {list(optim.milestones)}")
    for key in ("min_lr", "clip_grad_norm", "lr_reference_batch", "warmup_epochs", "schedule_epochs"):
        if optim[key] < 0:
            raise ConfigError(f"config: 'optim.{key}' must be >= 0, got {optim[key]}")
    if optim.min_lr > optim.lr:
        raise ConfigError(f"config: 'optim.min_lr' ({optim.min_lr}) is above 'optim.lr' ({optim.lr})")
    if dist.zero_stage not in ZERO_STAGES:
        raise ConfigError(f"config: 'dist.zero_stage' is {dist.zero_stage}; DeepSpeed ZeRO stages 0, 1 or 2 are supported")
    if dist.backend == "deepspeed" and train.precision == "fp16" and dist.zero_stage > 0:
        raise ConfigError("config: dist.backend=deepspeed with train.precision=fp16 needs dist.zero_stage=0 "
                          "(DeepSpeed's autocast loss scaler is ZeRO-0 only); use train.precision=bf16 with ZeRO 1/2")
    if train.keep_last < 1:
        raise ConfigError(f"config: 'train.keep_last' is {train.keep_last}; keep at least 1 checkpoint")
    if train.checkpoint_every < 0:
        raise ConfigError(f"config: 'train.checkpoint_every' must be >= 0 (0 = at epoch ends), got {train.checkpoint_every}")
    for name in train.preempt_signals:
        if not isinstance(getattr(signal, f"SIG{str(name).upper().removeprefix('SIG')}", None), signal.Signals):
            raise ConfigError(f"config: 'train.preempt_signals' names an unknown signal {name!r} (e.g. USR2, TERM)")


def check_numbers(cfg) -> None:
    """Every count, size and rate of the training sections, as one line naming the key."""
    optim, dist = cfg.optim, cfg.dist
    at_least("seed", cfg.seed, 0, "seeds are non-negative integers")
    at_least("log_every", cfg.log_every, 0, "0 = no step records")
    at_least("optim.epochs", optim.epochs, 1, "a run trains at least one epoch")
    at_least("optim.lr", optim.lr, 0.0, "the learning rate of the global batch; 0 keeps the weights")
    within("optim.momentum", optim.momentum, 0.0, 1.0)
    at_least("optim.weight_decay", optim.weight_decay, 0.0)
    positive("optim.gamma", optim.gamma, "multistep's LR factor")
    at_least("dist.nproc_per_node", dist.nproc_per_node, 1)
    for milestone in optim.milestones:
        at_least("optim.milestones", milestone, 0, "epochs")
    for factor in optim.step_factors:
        positive("optim.step_factors", factor)
    if optim.warmup_epochs >= optim.epochs > 0 and optim.warmup_epochs > 0:
        raise ConfigError(f"config: 'optim.warmup_epochs' ({optim.warmup_epochs}) must be below 'optim.epochs' "
                          f"({optim.epochs})")


def check_image_dtype(cfg) -> None:
    dtype, precision = cfg.data.dtype, cfg.train.precision
    needed = _PRECISION_OF_DTYPE.get(dtype)
    if needed is not None and precision != needed:
        raise ConfigError(f"config: data.dtype={dtype} needs train.precision={needed} (got {precision}); "
                          f"use data.dtype=float32 for {precision} training")


def check_resume(resume: str) -> None:
    """``auto``, ``never`` or a path; a near-miss of a keyword (``Auto``, ``none``) gets a hint instead of
    'checkpoint not found: Auto'."""
    lowered = str(resume).strip().lower()
    if resume in RESUME_WORDS:
        return
    if lowered in RESUME_WORDS or lowered in ("no", "none", "false", "off", "yes", "true", "latest"):
        raise ConfigError(f"config: 'resume' is {resume!r}; use auto (latest checkpoint of out_dir), never (start over) "
                          f"or the path of a checkpoint")


def check_batch_split(batch_size: int, accum_steps: int, world_size: int) -> None:
    """The global batch must split evenly into ``accum_steps`` micro-batches over ``world_size`` ranks."""
    if batch_size % (accum_steps * world_size):
        raise ConfigError(f"data.batch_size={batch_size} does not split into optim.accum_steps={accum_steps} "
                          f"micro-batches on {world_size} processes; use a multiple of {accum_steps * world_size}")


def check_runtime(cfg, device: torch.device) -> None:
    """Checks that need the machine: raise :class:`ConfigError` with the fix."""
    if cfg.dist.sync_bn and device.type != "cuda":
        raise ConfigError("config: dist.sync_bn=true needs CUDA devices (SyncBatchNorm does not run on CPU); "
                          "set dist.sync_bn=false")
    if cfg.train.tensorboard:
        check_tensorboard()
    if cfg.train.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("config: train.precision=bf16 but this GPU has no bfloat16 support; use fp16 or fp32")
    if cfg.dist.backend == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("config: dist.backend=deepspeed but DeepSpeed is not installed: "
                          "pip install --no-build-isolation deepspeed (or set dist.backend=ddp)")


def check_tensorboard() -> None:
    """Import what :class:`hpckd.train.monitor.Scalars` imports, so that a missing (or broken, e.g. a protobuf
    mismatch) TensorBoard is one line before anything starts, not a traceback from inside the run's set-up."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (imports `tensorboard` and checks its version)
    except ImportError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"config: train.tensorboard=true but TensorBoard cannot be imported ({reason}): "
                          "pip install tensorboard (or set train.tensorboard=false)") from None
