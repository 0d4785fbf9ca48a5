"""Teachers: ensembles and inline serving (a logit store with view replay plugs in behind the same interface).

* :mod:`~hpckd.teachers.ensemble` -- ``mean_logits`` / ``mean_probs`` / ``per_teacher_loss`` and the metrics
  reduction (:class:`EnsembleConfig`).
* :mod:`~hpckd.teachers.serving` -- :class:`TeacherSet`: frozen teachers, inference mode, bf16 + channels_last on
  CUDA, optional ``torch.compile``, and ``teacher_parallel`` sharding across DDP ranks (:class:`ServingConfig`).
* :mod:`~hpckd.teachers.shard` -- the collectives of teacher_parallel.
* :mod:`~hpckd.teachers.source` -- :class:`TeacherSource`, the interface the training loop relies on.
"""

from hpckd.teachers.ensemble import (
    ENSEMBLE_MODES,
    EnsembleConfig,
    combine,
    ensemble_distribution,
    mean_logits,
    mean_probs,
)
from hpckd.teachers.serving import ServingConfig, Teacher, TeacherSet, freeze
from hpckd.teachers.source import TeacherSource

__all__ = [
    "ENSEMBLE_MODES",
    "EnsembleConfig",
    "ServingConfig",
    "Teacher",
    "TeacherSet",
    "TeacherSource",
    "combine",
    "ensemble_distribution",
    "freeze",
    "mean_logits",
    "mean_probs",
]
