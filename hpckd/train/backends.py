"""Training backends: PyTorch DDP and DeepSpeed ZeRO, behind one small interface the loop drives.

One meaning of the three calls for both backends:

* ``forward(x)`` -- the student's training forward (autocast of the :class:`~hpckd.precision.PrecisionPolicy`);
* ``backward(loss, boundary)`` -- accumulate the gradients of one micro-batch (the loss is the micro-batch mean;
  the backend divides by the accumulation steps). Weights never change here;
* ``step()`` -- at the accumulation boundary only: clip, optimizer step, scheduler step, zero the gradients;
  returns the finite-step gate's device flag (DDP with fused SGD/AdamW, no gradient scaler) or None
  (:func:`hpckd.train.optim.finite_step_gate`).

The loop runs forward and backward inside ``no_sync(boundary)`` (no gradient all-reduce before the boundary).
``save``/``load`` write and read the full training state in the backend's own layout (see
:mod:`hpckd.checkpoint`).

* **ddp** -- ``DistributedDataParallel`` (NCCL on GPU, gloo on CPU; no wrapper for one process), gradient
  accumulation with ``no_sync`` on the micro-batches before the boundary, autocast for bf16/fp16 with a
  ``GradScaler`` for fp16, optional SyncBatchNorm (GPU only) and ``torch.compile``.
* **deepspeed** -- ``deepspeed.initialize`` with ZeRO stage 0/1/2 over the same optimizer (SGD is allowed with
  ``zero_allow_untested_optimizer``), micro-batch and accumulation settings derived from ``data.batch_size``,
  ``gradient_clipping`` set explicitly (DeepSpeed's default would be 1.0, silently), and mixed precision through
  DeepSpeed's ``torch_autocast`` section: parameters, BatchNorm buffers and the optimizer stay fp32 and only the
  forward runs in bf16/fp16, exactly as in the DDP backend (DeepSpeed's ``bf16`` section alone would keep BatchNorm
  buffers fp32 next to bf16 activations and fail). BatchNorm becomes SyncBatchNorm before ``initialize`` when asked
  (GPU only).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ContextManager

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hpckd import dist
from hpckd.checkpoint import DS_STATE_FILE, CheckpointStore, save_checkpoint
from hpckd.errors import CheckpointError
from hpckd.precision import PrecisionPolicy
from hpckd.train.optim import build_optimizer, build_scheduler, finite_step_gate, load_optimizer_state, reset_base_lr


def prepare_model(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    """Device, SyncBatchNorm (GPU only, checked before) and memory format, before any wrapper sees the model.

    ``train.channels_last`` converts the weights for DDP only: DeepSpeed flattens (ZeRO) and broadcasts parameters
    as contiguous storage and rejects channels-last strides. With DeepSpeed the inputs alone are channels-last;
    convolutions then still produce channels-last activations (the format follows the input)."""
    if cfg.dist.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg.train.channels_last and cfg.dist.backend == "ddp":
        model = model.to(memory_format=torch.channels_last)
    return model


def plain_section(node: Any) -> Any:
    """A config section as plain Python attributes: the schedule's factor reads ``optim.*`` at every optimizer step,
    and an OmegaConf attribute lookup costs microseconds (a dozen per step showed in the loop's profile)."""
    if isinstance(node, DictConfig):
        return SimpleNamespace(**OmegaConf.to_container(node, resolve=True))
    return node


class Backend:
    """What the loop needs from a backend (see the module docstring)."""

    name = "base"
    module: nn.Module  # the bare model: state_dict, evaluation
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The student's training forward (logits in the autocast dtype; the caller casts to fp32)."""
        raise NotImplementedError

    def no_sync(self, boundary: bool) -> ContextManager:
        """Context for forward + backward of one micro-batch (skips the gradient all-reduce before the boundary)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        """Accumulate one micro-batch's gradients; never changes the weights."""
        raise NotImplementedError

    def step(self) -> torch.Tensor | None:
        """At the accumulation boundary: clip, optimizer step, scheduler step, zero the gradients. Returns the
        finite-step gate's device flag (1.0: the step was skipped, its gradients held NaN/Inf), or None where the
        backend has no gate (:func:`hpckd.train.optim.finite_step_gate`)."""
        raise NotImplementedError

    def reset_lr(self, lr: float) -> None:
        """Continue the schedule from the current step with a new base rate (a resume with a changed optim.lr)."""
        reset_base_lr(self.optimizer, self.scheduler, lr)

    def lr(self) -> float:
        """The rate the next optimizer step uses (what the scheduler last set on the optimizer)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self) -> None:
        self.module.train()

    def save(self, store: CheckpointStore, step: int, state: dict[str, Any], is_main: bool) -> Path:
        raise NotImplementedError

    def load(self, path: Path, state: dict[str, Any]) -> None:
        raise NotImplementedError


class DDPBackend(Backend):
    name = "ddp"

    def __init__(self, model: nn.Module, cfg, info: dist.DistInfo, steps_per_epoch: int,
                 policy: PrecisionPolicy) -> None:
        self.module = model
        self.policy = policy
        self.accum = cfg.optim.accum_steps
        self.clip = cfg.optim.clip_grad_norm
        wrapped: nn.Module = model
        if info.distributed:
            wrapped = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        self.wrapped = wrapped
        self.ddp = wrapped if isinstance(wrapped, DistributedDataParallel) else None
        self.call = torch.compile(wrapped) if cfg.train.compile else wrapped
        self.optimizer = build_optimizer(cfg.optim, model, cfg.data.batch_size)
        self.scheduler = build_scheduler(plain_section(cfg.optim), self.optimizer, steps_per_epoch)
        self.scaler = policy.scaler()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.policy.student_autocast():
            return self.call(x)

    def no_sync(self, boundary: bool) -> ContextManager:
        if self.ddp is None or boundary:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        # Mean over the micro-batches of one step, so accumulation matches one big batch.
        loss = loss / self.accum
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> torch.Tensor | None:
        if self.clip > 0:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        skipped = None
        if self.scaler is not None:
            # fp16: the scaler skips overflowing steps by design (and, for a fused optimizer, passes its found_inf
            # to the kernel without a host sync); those skips are the scaler's business, not a divergence.
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            with finite_step_gate(self.optimizer) as skipped:
                self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return skipped

    def save(self, store: CheckpointStore, step: int, state: dict[str, Any], is_main: bool) -> Path:
        path = store.path_for(step, as_folder=False)
        if is_main:
            save_checkpoint(path, {**state, "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                                   "scheduler": self.scheduler.state_dict(),
                                   "scaler": None if self.scaler is None else self.scaler.state_dict()})
        return path

    def load(self, path: Path, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])


def deepspeed_config(cfg, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of an experiment: batch split, ZeRO stage, clipping and precision, all explicit."""
    accum = cfg.optim.accum_steps
    config: dict[str, Any] = {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.batch_size // (world_size * accum),
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(cfg.optim.clip_grad_norm),  # DeepSpeed's default is 1.0; 0.0 = off
        "zero_allow_untested_optimizer": True,  # our own SGD/AdamW with its parameter groups
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.dist.zero_stage > 0:
        config["zero_optimization"] = {"stage": int(cfg.dist.zero_stage)}
    if cfg.train.precision != "fp32":
        config["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16" if cfg.train.precision == "bf16" else "float16",
            # No module is marked "lower precision safe": gradients are all-reduced in fp32, as DDP does.
            "lower_precision_safe_modules": [],
        }
    return config


def _import_deepspeed(device: torch.device):
    if device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before the import: it picks the accelerator once
    import deepspeed

    for name in ("DeepSpeed", "deepspeed"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        if not any(isinstance(f, _ExpectedWarnings) for f in logger.filters):
            logger.addFilter(_ExpectedWarnings())
    return deepspeed


class _ExpectedWarnings(logging.Filter):
    """Drops DeepSpeed's warning about a ZeRO "untested optimizer": SGD is our deliberate choice (the studies'
    optimizer), allowed with ``zero_allow_untested_optimizer``; every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, model: nn.Module, cfg, info: dist.DistInfo, steps_per_epoch: int,
                 policy: PrecisionPolicy) -> None:
        deepspeed = _import_deepspeed(info.device)
        dist.ensure_process_group(info.device)
        # DeepSpeed reads LOCAL_RANK to pick its device; with one GPU bound per task that device is cuda:0.
        os.environ["LOCAL_RANK"] = str(info.device.index if info.device.type == "cuda" else info.local_rank)
        self.module = model
        # Not fused: DeepSpeed (ZeRO) drives the optimizer's step itself, so the finite-step gate cannot reach it.
        optimizer = build_optimizer(cfg.optim, model, cfg.data.batch_size, fused=False)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=deepspeed_config(cfg, info.world_size))
        # Our per-step schedule drives the wrapped optimizer's groups (shared with the ZeRO wrapper).
        self.scheduler = build_scheduler(plain_section(cfg.optim), optimizer, steps_per_epoch)
        if cfg.train.compile:
            self.engine.compile()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine(x)  # DeepSpeed applies its torch_autocast section itself

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        if self.engine.is_gradient_accumulation_boundary() != boundary:
            raise RuntimeError("DeepSpeed's micro-step counter disagrees with the loop's accumulation boundary")
        self.engine.backward(loss)  # divides by the accumulation steps itself
        if not boundary:
            # DeepSpeed counts micro-batches in engine.step() (its accumulation boundary comes from that count);
            # before the boundary the call only advances the count and touches no weight.
            self.engine.step()

    def step(self) -> torch.Tensor | None:
        self.engine.step()  # at the boundary: reduce, clip, optimizer step, zero the gradients
        self.scheduler.step()
        return None

    def save(self, store: CheckpointStore, step: int, state: dict[str, Any], is_main: bool) -> Path:
        folder = store.path_for(step, as_folder=True)
        # Every rank writes its part; hpckd_state.pt last (rank 0, atomic) marks the folder complete.
        self.engine.save_checkpoint(str(store.folder), tag=folder.name, client_state={}, save_latest=False)
        dist.barrier()
        if is_main:
            save_checkpoint(folder / DS_STATE_FILE, {**state, "model": None, "scheduler": self.scheduler.state_dict(),
                                                     "scaler": None})
        return folder

    def load(self, path: Path, state: dict[str, Any]) -> None:
        loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
        self.scheduler.load_state_dict(state["scheduler"])


def build_backend(cfg, model: nn.Module, info: dist.DistInfo, steps_per_epoch: int,
                  policy: PrecisionPolicy) -> Backend:
    """The backend of ``dist.backend`` around a prepared model (:func:`prepare_model`)."""
    if cfg.dist.backend == "deepspeed":
        return DeepSpeedBackend(model, cfg, info, steps_per_epoch, policy)
    return DDPBackend(model, cfg, info, steps_per_epoch, policy)
