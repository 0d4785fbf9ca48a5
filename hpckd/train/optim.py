"""Optimizers and per-step learning-rate schedules.

``optim.lr`` is the learning rate for the configured *global* batch (``data.batch_size``); it is not rescaled
when the world size changes, because the global batch stays the same (each rank gets batch_size / world_size).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def lr_factor(cfg, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (linear warmup, then the schedule)."""
    epoch = step / steps_per_epoch
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        total = max(cfg.epochs - cfg.warmup_epochs, 1e-8)
        progress = min((epoch - cfg.warmup_epochs) / total, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    return 1.0


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch))
