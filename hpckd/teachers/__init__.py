"""Teachers: ensembles and inline serving (a logit store with view replay plugs in behind the same interface).

* :mod:`~hpckd.teachers.ensemble` -- the ensemble reductions ``mean_probs`` / ``mean_logits`` (and the
  ``per_teacher_loss`` mode), shared by the loss and the metrics.
* :mod:`~hpckd.teachers.serving` -- :class:`TeacherSet`: frozen teachers, inference mode, bf16 + channels_last on
  CUDA, optional ``torch.compile``, and ``teacher_parallel`` sharding across DDP ranks (:class:`ServingConfig`).
* :mod:`~hpckd.teachers.shard` -- the collectives of teacher_parallel.
* :mod:`~hpckd.teachers.source` -- :class:`TeacherSource`, the interface the training loop relies on.
* :mod:`~hpckd.teachers.store` -- the logit store: :class:`LogitStore` (shards, checksums, manifest key) and
  :class:`StoreSource` (``serving.mode=cached``); :mod:`~hpckd.teachers.store_writer` writes and verifies one
  (``hpckd teachers cache``).

The serving names load on first use (PEP 562): :mod:`hpckd.losses` and :mod:`hpckd.metrics` import the ensemble
maths from here, and should not pay for the model zoo (torchvision) that serving needs.
"""

from __future__ import annotations

import importlib
from typing import Any

from hpckd.teachers.ensemble import ENSEMBLE_MODES, REDUCTIONS, ensemble_distribution, mean_logits, mean_probs

_LAZY: dict[str, str] = {
    "ServingConfig": "hpckd.teachers.serving",
    "Teacher": "hpckd.teachers.serving",
    "TeacherSet": "hpckd.teachers.serving",
    "freeze": "hpckd.teachers.serving",
    "TeacherSource": "hpckd.teachers.source",
    "LogitStore": "hpckd.teachers.store",
    "StoreSource": "hpckd.teachers.store",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hpckd.teachers' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [
    "ENSEMBLE_MODES",
    "LogitStore",
    "REDUCTIONS",
    "ServingConfig",
    "StoreSource",
    "Teacher",
    "TeacherSet",
    "TeacherSource",
    "ensemble_distribution",
    "freeze",
    "mean_logits",
    "mean_probs",
]
