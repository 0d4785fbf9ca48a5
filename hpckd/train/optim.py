"""Optimizers, parameter groups and per-step learning-rate schedules.

Learning rate and global batch
------------------------------
``optim.lr`` is the learning rate of the configured *global* batch ``data.batch_size`` (the images behind one
optimizer step, summed over ranks and accumulation micro-batches). Changing the world size or ``optim.accum_steps``
therefore changes nothing about the experiment. To move a recipe to another global batch, either set ``optim.lr``
yourself or give the batch the recipe's LR was tuned for in ``optim.lr_reference_batch``; the LR (and
``optim.min_lr``) are then scaled by the linear scaling rule of Goyal et al. 2017 ("Accurate, Large Minibatch SGD",
Sec. 2.1): ``lr_used = lr * batch_size / lr_reference_batch``. Large scale-ups want ``optim.warmup_epochs`` too
(their Sec. 2.2).

Schedules (the multiplier is applied at every optimizer step, so decays are smooth within an epoch)
-------------------------------------------------------------------------------------------------
* warmup (Goyal et al. 2017, Sec. 2.2, "gradual warmup"): ``lr * (t + 1) / T_w`` for the first ``T_w`` steps.
* cosine (Loshchilov & Hutter 2017, "SGDR", Eq. 5 without restarts):
  ``eta_min + (eta_max - eta_min) * (1 + cos(pi * T_cur / T_max)) / 2``, ``eta_min = optim.min_lr``; the fidelity
  study uses eta_max 0.05, eta_min 1e-4 for students, the attention study eta_min 0.
* multistep: ``gamma ** k`` after the k-th milestone (epochs), e.g. the augmentation study's decay by 0.1 at epochs
  150, 180, 210 of 240; or explicit factors per milestone (``optim.step_factors``), for the attention study's
  lambda schedules (step_1, step_2, step_3) when the factors are not powers of one gamma.
* constant.

The finite-step gate (a NaN never reaches the weights, and no host sync)
-----------------------------------------------------------------------
With ``optim.fused`` (default) SGD and AdamW run torch's fused kernels, which take a device flag ``found_inf`` and
leave parameters and optimizer state untouched when it is set (the mechanism ``torch.amp.GradScaler`` uses for fp16).
:func:`finite_step_gate` sets that flag from the gradients themselves before each step (one foreach kernel that
reads the gradients; multiplying by 1 leaves them bit-identical), so a step whose gradients hold NaN/Inf is skipped
on the device without the host ever waiting for it; the training loop reads the flag at its next check point and
stops the run naming the step (:class:`hpckd.train.step.FiniteWatch`). SGD's momentum buffers are created as zeros
before the first step: a skipped first step would otherwise leave them uninitialised (torch allocates them with
``empty_like`` inside the step), and with dampening 0 a zero buffer gives the first step's ``buf = g`` exactly.
Without fused kernels (``optim.fused=false``, a device torch has none for, DeepSpeed, which owns its step) the loop
still never saves, logs or evaluates a non-finite state, but the weights in memory may hold NaN until the next check
point.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
from torch import nn

# Modules whose affine parameters are scale/shift of a normalisation, not weights of a linear map.
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    NORM_TYPES = NORM_TYPES + (nn.RMSNorm,)


def scaled_lr(cfg, batch_size: int) -> tuple[float, float]:
    """(lr, min_lr) after the optional linear scaling to the global batch (Goyal et al. 2017, Sec. 2.1)."""
    factor = batch_size / cfg.lr_reference_batch if cfg.lr_reference_batch > 0 else 1.0
    return cfg.lr * factor, cfg.min_lr * factor


def param_groups(model: nn.Module, weight_decay: float, exclude_norm_bias: bool) -> list[dict[str, Any]]:
    """One group with ``weight_decay``, or two when norm parameters and biases are exempt from decay.

    Exempting them is the "no bias decay" trick of He et al. 2019 ("Bag of Tricks", Sec. 3.1): decaying a
    normalisation's scale or any bias only shrinks the function's offsets, it does not regularise a linear map.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not exclude_norm_bias or weight_decay == 0:
        return [{"params": [p for _, p in trainable], "weight_decay": weight_decay}]
    exempt = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    exempt |= {id(p) for n, p in trainable if n.rsplit(".", 1)[-1] == "bias"}
    decay = [p for _, p in trainable if id(p) not in exempt]
    no_decay = [p for _, p in trainable if id(p) in exempt]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def build_optimizer(cfg, model: nn.Module, batch_size: int | None = None,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW over :func:`param_groups`; ``batch_size`` is the global batch.

    ``fused`` (default ``optim.fused``): torch's fused kernels when the parameters' device has them, which also
    enables :func:`finite_step_gate`; DeepSpeed passes False (it drives the step itself)."""
    lr, _ = scaled_lr(cfg, batch_size) if batch_size else (cfg.lr, cfg.min_lr)
    groups = param_groups(model, cfg.weight_decay, cfg.wd_exclude_norm_bias)
    wanted = bool(getattr(cfg, "fused", True)) if fused is None else fused
    use_fused = wanted and fused_supported([p for g in groups for p in g["params"]])
    kind = {"fused": True} if use_fused else {}
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **kind)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                                **kind)
    if use_fused and cfg.momentum > 0:
        for p in (p for g in groups for p in g["params"]):
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch has fused SGD/AdamW kernels for every parameter (floating point, on a device it supports)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    return bool(params) and all(p.device.type in devices and torch.is_floating_point(p) for p in params)


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return all(bool(group.get("fused")) for group in optimizer.param_groups)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict`` keeping this build's kernel choice: the groups of a saved state carry the
    ``fused``/``foreach`` flags of the run that wrote it (an older hpckd's had none), which are not part of the
    experiment; the numbers (momentum, moments, step counts) are restored as saved."""
    kernels = [{k: group.get(k) for k in ("fused", "foreach")} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, kernels):
        group.update(kept)


@contextlib.contextmanager
def finite_step_gate(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor | None]:
    """Around ``optimizer.step()``: a fused optimizer skips the step on the device when a gradient holds NaN/Inf.

    Yields the (0-dim fp32, on the gradients' device) flag, 1.0 when the step is skipped, or None when the optimizer
    is not fused (no gate; see the module docstring). No host sync: the flag is read at the loop's check points."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads or not is_fused(optimizer):
        yield None
        return
    found_inf = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    one = torch.ones((), dtype=torch.float32, device=grads[0].device)
    # GradScaler's own check: sets found_inf if any gradient element is NaN/Inf; the "unscale" by 1 changes no bit.
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, one)
    optimizer.found_inf, optimizer.grad_scale = found_inf, None  # read by the fused kernels (torch.optim's API)
    try:
        yield found_inf
    finally:
        del optimizer.found_inf, optimizer.grad_scale


def lr_factor(cfg, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based): warmup, then the schedule.

    With ``min_lr > 0`` the cosine factor is ``r + (1 - r) * (1 + cos(pi * progress)) / 2`` with ``r = min_lr / lr``,
    which is SGDR's Eq. 5 divided by eta_max.
    """
    epoch = step / steps_per_epoch
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        length = getattr(cfg, "schedule_epochs", 0) or cfg.epochs  # a longer cosine stops before its floor
        span = max(length - cfg.warmup_epochs, 1e-8)
        progress = min((epoch - cfg.warmup_epochs) / span, 1.0)
        floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "multistep":
        passed = sum(1 for m in cfg.milestones if epoch >= m)
        if cfg.step_factors:
            return 1.0 if passed == 0 else float(cfg.step_factors[passed - 1])
        return cfg.gamma**passed
    return 1.0


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-optimizer-step ``LambdaLR`` of :func:`lr_factor`; its state is just the step count (resumable).

    The factor is a plain function on purpose: ``LambdaLR.state_dict`` stores the attributes of callable objects,
    which would put the config into every checkpoint.
    """

    def factor(step: int) -> float:
        return lr_factor(cfg, step, steps_per_epoch)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def reset_base_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """Give a restored optimizer and schedule a new base rate, keeping the step count: from the next step on,
    ``lr_t = lr * factor(t)`` as if the run had used ``lr`` from the start (``resume_changes=[optim.lr]``)."""
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, lam in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * lam(scheduler.last_epoch)
