"""One evaluation pass over a split: every metric of :class:`~hpckd.metrics.evaluator.Evaluator`, exact across ranks."""

from __future__ import annotations

import torch
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
