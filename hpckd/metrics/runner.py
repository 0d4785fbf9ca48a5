"""One evaluation pass over a split: every metric of :class:`~hpckd.metrics.evaluator.Evaluator`, exact across ranks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from hpckd.data.batch import STUDENT
from hpckd.metrics.attention import IoUAccumulator, class_activation_maps
from hpckd.metrics.ensemble import ensemble_logprobs
from hpckd.metrics.evaluator import Evaluator
from hpckd.models.hooks import cam_features, has_cam


@torch.no_grad()
def evaluate(model: nn.Module, loader, teachers, num_classes: int, metrics_cfg) -> dict[str, float]:
    """Exact metrics over the whole split: sufficient statistics are all-reduced across ranks.

    With two or more CNN teachers (run inline on this rank), also the IoU of teacher 0's and teacher 1's class
    activation maps (attention study Eq. 1; ``metrics.cam_target``, ``metrics.cam_threshold``), as
    ``teacher_iou`` (mean of per-image IoUs), ``teacher_iou_pooled`` and ``teacher_iou_batch_pooled``.
    """
    from hpckd.config import evaluator_options  # the config imports this package

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
            maps = [_teacher_cam(t, batch, metrics_cfg.cam_target) for t in teachers.teachers[:2]]
            iou.update(maps[0], maps[1], valid=batch.valid)
    metrics = evaluator.compute()
    if iou is not None:
        metrics.update({f"teacher_{k}": v for k, v in iou.compute().items()})
    return metrics


def _cam_teachers(teachers, metrics_cfg) -> bool:
    """Teacher CAM-IoU applies to >= 2 CNN teachers with a CAM (not VGG's MLP head, not ViT) run on this rank."""
    if teachers is None or not metrics_cfg.attention_iou or len(teachers.teachers) < 2:
        return False
    return all(t.model is not None and has_cam(t.model) for t in teachers.teachers[:2])


def _teacher_cam(teacher, batch, target: str) -> torch.Tensor:
    features, weight, bias = cam_features(teacher.model, batch.view(teacher.role))
    return class_activation_maps(features.float(), weight.float(), None if bias is None else bias.float(),
                                 target=target, labels=batch.labels)


def evaluate_checkpoint(path: str | Path, split: str = "val", augmented: bool = False,
                        overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``hpckd eval``: every metric of a checkpoint on a split, stored in its run's ``results.json``.

    The run's config comes from the checkpoint (dotted ``overrides`` apply on top, e.g. ``data.root=...``).
    ``augmented`` evaluates on the split under the run's training policy with the dataset's fixed Affinity seed
    (the shared D'_val of the attention study, Eq. 5); once both the clean and the augmented pass of a split are
    stored, their Affinity is stored too. Teachers of the config (if any) give the fidelity metrics.
    """
    from hpckd import dist
    from hpckd.config import load_config
    from hpckd.data.aug import eval_policy, train_policy
    from hpckd.data.dali import ShardSpec
    from hpckd.data.datasets import load_splits
    from hpckd.data.loaders import loader_class
    from hpckd.io import atomic_write_json
    from hpckd.metrics.affinity import affinity, affinity_seed
    from hpckd.models import apply_state_dict, create
    from hpckd.train.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    cfg = load_config(None, overrides, base=state["config"])
    info = dist.init(cfg.dist.device)
    train_index, val_index = load_splits(cfg.data)
    index = val_index if split == "val" else train_index
    data = cfg.data
    policy = train_policy(data.family, cfg.aug, data.image_size) if augmented else eval_policy(data.family, data.image_size)
    seed = affinity_seed(index.fingerprint()) if augmented else cfg.seed
    loader = loader_class(data.loader)(index.source, index.labels, {STUDENT: policy}, batch_size=_per_rank(data.eval_batch_size, info),
                                        shard=ShardSpec(info.rank, info.world_size), train=False, seed=seed,
                                        num_threads=data.num_workers, device=info.device, mean=data.mean, std=data.std)
    model = create(state["arch"], state["num_classes"], **state.get("arch_kwargs", {})).to(info.device)
    apply_state_dict(model, state["model"], str(path))
    teachers = None
    if cfg.teachers:
        from hpckd.teachers import ServingConfig, TeacherSet

        teachers = TeacherSet.from_checkpoints([t.checkpoint for t in cfg.teachers], info.device,
                                               ServingConfig(**OmegaConf.to_container(cfg.serving)))
    metrics = evaluate(model, loader, teachers, state["num_classes"], cfg.metrics)
    key = f"{split}_augmented" if augmented else split
    if info.is_main:
        results_path = Path(path).parent / "results.json"
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        stored = results.setdefault("eval", {})
        stored[key] = {**metrics, "checkpoint": str(path), "policy": policy.name, "seed": seed}
        if split in stored and f"{split}_augmented" in stored:
            stored[f"{split}_affinity"] = affinity(stored[f"{split}_augmented"]["accuracy"], stored[split]["accuracy"])
        atomic_write_json(results_path, results)
    return {key: metrics}


def _per_rank(global_batch: int, info) -> int:
    return max(1, global_batch // info.world_size)
