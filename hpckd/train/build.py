"""What a run is made of, built the same way for training and for ``hpckd eval``: the teacher source, the student
model and its precision policy."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpckd.errors import CheckpointError, ConfigError
from hpckd.config import ServingConfig
from hpckd.models import create, load_weights
from hpckd.models.interpolation import init_from_teacher
from hpckd.precision import PrecisionPolicy
from hpckd.teachers.serving import TeacherSet
from hpckd.teachers.source import TeacherSource
from hpckd.teachers.store import open_store


def build_teachers(cfg: Any, device: torch.device, policy: PrecisionPolicy, inline: bool = False) -> TeacherSource:
    """The teachers of ``cfg.teachers`` served inline (``serving``) at the policy's teacher precision, or read from
    a logit store (``serving.mode=cached``; refused with one line when the store was written for another run).
    ``inline=True`` always runs the teachers (evaluation of a cached run needs no store: ``hpckd eval``).

    A checkpoint that never took a training step (e.g. an ``optim.epochs=0`` run of an old hpckd) is refused: its
    weights are an untrained initialisation, not a teacher."""
    paths = [t.checkpoint for t in cfg.teachers]
    serving = ServingConfig(**{k: cfg.serving[k] for k in cfg.serving})
    if serving.mode == "cached" and not inline:
        return open_store(cfg, device, serving, inline=lambda: _inline(paths, device, serving, policy))
    return _inline(paths, device, serving, policy)


def _inline(paths: list[str], device: torch.device, serving: ServingConfig, policy: PrecisionPolicy) -> TeacherSet:
    # Building the teachers' models draws nothing from the RNG the student is then initialised from: a run reading
    # a logit store (no teacher models) starts from the same student weights as the inline run.
    with torch.random.fork_rng(devices=[]):
        teachers = TeacherSet.from_checkpoints(paths, device, serving, precision=policy)
    for teacher in teachers.teachers:
        if teacher.meta.get("step") == 0:
            raise CheckpointError(f"teacher {teacher.index} ({teacher.source}) was saved before any training step; "
                                  f"train it first (optim.epochs >= 1)")
    return teachers


def build_student(cfg: Any, num_classes: int) -> nn.Module:
    """The model being trained (``model.arch`` with ``model.kwargs``), from ``model.weights`` when given."""
    model = create(cfg.model.arch, num_classes, **cfg.model.kwargs)
    if cfg.model.weights:
        load_weights(model, cfg.model.weights, drop_head=cfg.model.drop_head)
    init_path = getattr(cfg.model, "init_from_teacher", None)
    if init_path:  # fidelity study Fig. 6b: start between the random init and the teacher
        if cfg.model.weights:
            raise ConfigError("model.weights and model.init_from_teacher both choose the starting weights; keep one")
        init_from_teacher(model, init_path, cfg.model.init_lambda)
    return model
