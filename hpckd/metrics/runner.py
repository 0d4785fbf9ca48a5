"""One evaluation pass over a split: every metric of :class:`~hpckd.metrics.evaluator.Evaluator`, exact across ranks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from hpckd.data.batch import STUDENT
from hpckd.metrics.ensemble import ensemble_logprobs
from hpckd.metrics.evaluator import Evaluator


@torch.no_grad()
def evaluate(model: nn.Module, loader, teachers, num_classes: int, metrics_cfg) -> dict[str, float]:
    """Exact metrics over the whole split: sufficient statistics are all-reduced across ranks."""
    from hpckd.config import evaluator_options  # the config imports this package

    model.eval()
    evaluator = Evaluator(num_classes, evaluator_options(metrics_cfg))
    for batch in loader:
        logits = model(batch.views[STUDENT])
        teacher = None
        if teachers is not None:
            teacher = ensemble_logprobs(teachers(batch), mode=metrics_cfg.ensemble)
        evaluator.update(logits, batch.labels, teacher_logits=teacher, valid=batch.valid)
    return evaluator.compute()


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
