"""The one training loop: teachers (cross-entropy) and students (any KD loss) alike.

``run(cfg, mode)`` initialises the process group from whatever launched us (:func:`hpckd.dist.init`), builds
loaders, model, teachers and loss, trains for ``optim.epochs``, evaluates exactly (every validation sample once
across ranks) after each epoch, writes ``last.pt`` atomically after each epoch and ``results.json`` atomically at
the end, and logs JSON lines to ``log.jsonl``. Rank 0 writes every file.
"""

from __future__ import annotations

import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hpckd import dist
from hpckd.config import to_container
from hpckd.data.batch import STUDENT, Batch
from hpckd.data.loaders import build_loaders
from hpckd.errors import ConfigError, UserError
from hpckd.io import atomic_write_json
from hpckd.losses import NonFiniteError, build_loss
from hpckd.metrics.runner import evaluate
from hpckd.models import create
from hpckd.train.checkpoint import save_checkpoint
from hpckd.train.optim import build_optimizer, build_scheduler


class TrainingDiverged(UserError):
    """The loss became NaN/Inf; the last good checkpoint is left untouched."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(cfg, mode: str = "distill") -> dict[str, Any]:
    """Train one model. ``mode="train"``: a teacher with CE; ``mode="distill"``: a student from ``cfg.teachers``."""
    if mode == "distill" and not cfg.teachers:
        raise ConfigError("distill needs at least one entry in 'teachers' (a checkpoint written by `hpckd train`)")
    info = dist.init(cfg.dist.device)
    started = time.time()
    seed_everything(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    out_dir = Path(cfg.out_dir)
    teacher_cfgs = list(cfg.teachers) if mode == "distill" else []
    teachers = _load_teachers([t.checkpoint for t in teacher_cfgs], info.device, cfg.serving) if teacher_cfgs else None
    loaders = build_loaders(cfg, info, [t.aug for t in teacher_cfgs])
    num_classes = loaders.num_classes
    if teachers is not None:
        teachers.check_num_classes(num_classes)
    model = create(cfg.model.arch, num_classes, **cfg.model.kwargs).to(info.device)
    if cfg.model.weights:
        from hpckd.models import load_weights

        load_weights(model, cfg.model.weights, drop_head=cfg.model.drop_head)
    ddp_model: nn.Module = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None) if info.distributed else model
    loss_fn = build_loss(_loss_cfg(cfg, mode))
    optimizer = build_optimizer(cfg.optim, model)
    steps_per_epoch = len(loaders.train)
    scheduler = build_scheduler(cfg.optim, optimizer, steps_per_epoch)
    logger = JsonLogger(out_dir / "log.jsonl" if info.is_main else None)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        logger.log({"event": "start", "mode": mode, "world_size": info.world_size, "launcher": info.launcher,
                    "device": str(info.device), "train_samples": len(loaders.train_index), "val_samples": len(loaders.val_index)})

    history: list[dict[str, Any]] = []
    train_time = 0.0
    step = 0
    metrics: dict[str, float] = {}
    for epoch in range(cfg.optim.epochs):
        loaders.train.set_epoch(epoch)
        t0 = time.time()
        epoch_stats = train_one_epoch(ddp_model, loaders.train, teachers, loss_fn, optimizer, scheduler, epoch, step,
                                      logger, cfg.log_every, info)
        train_time += time.time() - t0
        step += steps_per_epoch
        metrics = evaluate(model, loaders.val, teachers, num_classes, cfg.metrics)
        record = {"epoch": epoch, **epoch_stats, **{f"val_{k}": v for k, v in metrics.items()}}
        history.append(record)
        logger.log({"event": "epoch", **record})
        if info.is_main:
            save_checkpoint(out_dir / "last.pt", {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "arch": cfg.model.arch, "arch_kwargs": dict(cfg.model.kwargs), "num_classes": num_classes, "config": to_container(cfg), "epoch": epoch,
                "meta": {"aug": cfg.aug, "mode": mode, "fingerprint": loaders.train_index.fingerprint(),
                         "classes": loaders.train_index.classes, "val_acc": metrics.get("accuracy")},
            })
    images = steps_per_epoch * cfg.data.batch_size * cfg.optim.epochs
    results = {
        "name": cfg.name, "mode": mode, "config": to_container(cfg), "metrics": metrics, "history": history,
        "timings": {"total_s": time.time() - started, "train_s": train_time,
                    "train_images_per_s": images / train_time if train_time > 0 else None},
        "data": {"train_fingerprint": loaders.train_index.fingerprint(), "val_fingerprint": loaders.val_index.fingerprint(),
                 "classes": loaders.train_index.classes, "skipped_images": loaders.train_index.skipped + loaders.val_index.skipped},
        "world_size": info.world_size, "launcher": info.launcher, "versions": versions(),
    }
    if info.is_main:
        atomic_write_json(out_dir / "results.json", results)
        logger.log({"event": "end", "val_accuracy": metrics.get("accuracy")})
    dist.barrier()
    return results


def _load_teachers(checkpoints: list[str], device, serving):
    from hpckd.teachers import ServingConfig, TeacherSet

    return TeacherSet.from_checkpoints(checkpoints, device, ServingConfig(**to_container(serving)))


def _loss_cfg(cfg, mode: str):
    if mode == "train":
        from hpckd.losses import LossConfig

        return LossConfig(name="ce")
    return cfg.loss


def train_one_epoch(model: nn.Module, loader, teachers, loss_fn, optimizer, scheduler, epoch: int, step: int,
                    logger: "JsonLogger", log_every: int, info: dist.DistInfo) -> dict[str, float]:
    model.train()
    sums: dict[str, torch.Tensor] = {}
    batches = 0
    bar = _progress(loader, f"epoch {epoch}", info)
    for batch in bar:
        teacher_logits = teachers(batch) if teachers is not None else []
        student_logits = model(batch.views[STUDENT])
        try:
            terms = loss_fn(student_logits, teacher_logits, batch)
        except NonFiniteError as exc:
            raise TrainingDiverged(f"epoch {epoch}, step {step + batches}: {exc}; the last checkpoint was kept") from None
        loss = terms["loss"]
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch}, step {step + batches}; "
                                   f"the last checkpoint was kept (lower optim.lr?)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
        batches += 1
        if info.is_main and log_every and (step + batches) % log_every == 0:
            logger.log({"event": "step", "step": step + batches, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                        **{k: float(v.detach()) for k, v in terms.items()}})
    # One host sync per epoch, not per step.
    return {f"train_{k}": float(v) / max(batches, 1) for k, v in sums.items()}


def _progress(loader, desc: str, info: dist.DistInfo):
    if info.is_main and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(loader, desc=desc, total=len(loader), leave=False)
    return loader


class JsonLogger:
    """JSON-lines log; appends one flushed line per record (rank 0 only; others pass ``None``)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def log(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps({"time": round(time.time(), 3), **record}, default=float) + "\n")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    for name in ("torchvision", "nvidia.dali", "numpy", "omegaconf"):
        try:
            module = __import__(name, fromlist=["__version__"])
            found[name] = getattr(module, "__version__", "?")
        except ImportError:
            pass
    return found
