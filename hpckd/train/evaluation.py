"""The one evaluation path: the per-epoch evaluation of a run and ``hpckd eval`` build their loader, model and
teachers through the same functions (:mod:`hpckd.train.build`, :func:`hpckd.data.loaders.build_eval_loader`) and
run the same pass (:func:`evaluate`).

The metrics themselves are pure functions and the streaming :class:`~hpckd.metrics.evaluator.Evaluator`; this
module feeds them: student logits, the teacher ensemble's distribution and, with two or more CNN teachers, the IoU
of teacher 0's and teacher 1's class activation maps (attention study Eq. 1), which come through the teacher
interface's CAM capability (:meth:`~hpckd.teachers.source.TeacherSource.cam_features`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from hpckd import dist
from hpckd.checkpoint import load_checkpoint
from hpckd.data.batch import STUDENT
from hpckd.data.aug import eval_policy
from hpckd.data.datasets import load_splits
from hpckd.data.loaders import build_eval_loader, student_policy
from hpckd.errors import UserError
from hpckd.io import atomic_write_json
from hpckd.metrics.affinity import affinity, affinity_seed
from hpckd.metrics.attention import IoUAccumulator, class_activation_maps
from hpckd.metrics.checks import evaluator_options
from hpckd.metrics.ensemble import ensemble_logprobs
from hpckd.metrics.evaluator import Evaluator
from hpckd.models import apply_state_dict, create
from hpckd.precision import PrecisionPolicy
from hpckd.teachers.source import TeacherSource
from hpckd.train.build import build_teachers
from hpckd.train.experiment import load_experiment


class EvalForward(nn.Module):
    """The bare student for evaluation, fed as in training (the policy's autocast and input layout), logits in
    fp32; puts the model back in training mode on exit."""

    def __init__(self, module: nn.Module, policy: PrecisionPolicy) -> None:
        super().__init__()
        self.module, self.policy = module, policy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.policy.student_autocast():
            return self.module(self.policy.student_input(x)).float()

    def __enter__(self) -> "EvalForward":
        self.module.eval()
        return self

    def __exit__(self, *exc: object) -> None:
        self.module.train()


@torch.no_grad()
def evaluate(model: nn.Module, loader, teachers: TeacherSource | None, num_classes: int, metrics_cfg) -> dict[str, float]:
    """Exact metrics over the whole split: sufficient statistics are all-reduced across ranks.

    With two or more CNN teachers run on this rank, also the IoU of teacher 0's and teacher 1's class activation
    maps (attention study Eq. 1; ``metrics.cam_target``, ``metrics.cam_threshold``), as ``teacher_iou`` (mean of
    per-image IoUs), ``teacher_iou_pooled`` and ``teacher_iou_batch_pooled``.
    """
    model.eval()
    evaluator = Evaluator(num_classes, evaluator_options(metrics_cfg))
    iou = IoUAccumulator(threshold=metrics_cfg.cam_threshold) if _cam_teachers(teachers, metrics_cfg) else None
    for batch in loader:
        logits = model(batch.views[STUDENT])
        teacher = None
        if teachers is not None:
            teacher = ensemble_logprobs(teachers(batch), mode=metrics_cfg.ensemble)
        evaluator.update(logits, batch.labels, teacher_logits=teacher, valid=batch.valid)
        if iou is not None:
            maps = [_teacher_cam(teachers, batch, k, metrics_cfg.cam_target) for k in (0, 1)]
            iou.update(maps[0], maps[1], valid=batch.valid)
    metrics = evaluator.compute()
    if iou is not None:
        metrics.update({f"teacher_{k}": v for k, v in iou.compute().items()})
    return metrics


def _cam_teachers(teachers: TeacherSource | None, metrics_cfg) -> bool:
    """Teacher CAM-IoU applies to >= 2 teachers whose first two have a CAM on this rank (CNNs with a GAP + linear
    head, not VGG's MLP head, not a ViT, not a logit store)."""
    if teachers is None or not metrics_cfg.attention_iou or len(teachers) < 2:
        return False
    return all(teachers.has_cam_features(k) for k in (0, 1))


def _teacher_cam(teachers: TeacherSource, batch, index: int, target: str) -> torch.Tensor:
    features, weight, bias = teachers.cam_features(batch, index)
    return class_activation_maps(features, weight, bias, target=target, labels=batch.labels)


def evaluate_checkpoint(path: str | Path, split: str = "val", augmented: bool = False,
                        overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``hpckd eval``: every metric of a checkpoint on a split, stored in its run's ``results.json``.

    The run's config comes from the checkpoint (dotted ``overrides`` apply on top, e.g. ``data.root=...``).
    ``augmented`` evaluates on the split under the run's training policy (:func:`student_policy`, the same function
    training uses, crop choice included) with the dataset's fixed Affinity seed (the shared D'_val of the
    attention study, Eq. 5); once both the clean and the augmented pass of a split are stored, their Affinity is
    stored too. Teachers of the config (if any) give the fidelity metrics.
    """
    state = load_checkpoint(path)
    cfg = load_experiment(None, overrides, base=state["config"])
    info = dist.init(cfg.dist.device)
    policy = PrecisionPolicy.from_config(cfg, info.device)
    train_index, val_index = load_splits(cfg.data)
    index = val_index if split == "val" else train_index
    view = student_policy(cfg) if augmented else eval_policy(cfg.data.family, cfg.data.image_size)
    seed = affinity_seed(index.fingerprint()) if augmented else cfg.seed
    loader = build_eval_loader(cfg, info, index, view, seed)
    model = create(state["arch"], state["num_classes"], **state.get("arch_kwargs", {})).to(info.device)
    apply_state_dict(model, state["model"], str(path))
    teachers = build_teachers(cfg, info.device, policy) if cfg.teachers else None
    with EvalForward(model, policy) as forward:
        metrics = evaluate(forward, loader, teachers, state["num_classes"], cfg.metrics)
    key = f"{split}_augmented" if augmented else split
    if info.is_main:
        _store(Path(path).parent / "results.json", key, split, {**metrics, "checkpoint": str(path),
                                                                "policy": view.name, "policy_spec": dataclasses.asdict(view),
                                                                "seed": seed})
    return {key: metrics}


def _store(results_path: Path, key: str, split: str, record: dict[str, Any]) -> None:
    results = {}
    if results_path.is_file():
        try:
            results = json.loads(results_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{results_path} is not valid JSON ({exc}); move it aside to let hpckd eval write a new "
                            f"one") from exc
    stored = results.setdefault("eval", {})
    stored[key] = record
    if split in stored and f"{split}_augmented" in stored:
        stored[f"{split}_affinity"] = affinity(stored[f"{split}_augmented"]["accuracy"], stored[split]["accuracy"])
    atomic_write_json(results_path, results)
