"""Analysis metrics of the four reference studies, as tensor functions and a streaming, all-reducing Evaluator.

One evaluation pass feeds :class:`Evaluator`; the functions compute the same quantities on whole tensors (for
analysis notebooks, reports and tests). Module map (one concern each):

- :mod:`~hpckd.metrics.classification`: accuracy, NLL, entropy, train-val gap
- :mod:`~hpckd.metrics.ensemble`: float64 log-probabilities of a model or a teacher ensemble (the reductions of
  :mod:`hpckd.teachers.ensemble`)
- :mod:`~hpckd.metrics.fidelity`: top-1 agreement, predictive KL, independent-student baseline
- :mod:`~hpckd.metrics.information`: mutual information of top-1 labels (+ Miller-Madow)
- :mod:`~hpckd.metrics.calibration`: ECE and reliability diagrams
- :mod:`~hpckd.metrics.tstddev`: T. stddev and its covariance/correlation variants
- :mod:`~hpckd.metrics.attention`: CAMs, ViT attention (CLS, rollout), attention IoU
- :mod:`~hpckd.metrics.affinity`: Affinity
- :mod:`~hpckd.metrics.stats`: A/B-test p-value, normalised accuracy, Pearson/Spearman correlation
- :mod:`~hpckd.metrics.exact`: exact (fixed-point int64) sums and their all-reduce
- :mod:`~hpckd.metrics.evaluator`: the streaming Evaluator
"""

from hpckd.metrics.affinity import affinity, affinity_seed
from hpckd.metrics.attention import (
    IoUAccumulator,
    attention_iou,
    attention_rollout,
    class_activation_maps,
    minmax_normalize,
    resize_maps,
    vit_cls_attention,
)
from hpckd.metrics.calibration import ReliabilityDiagram, ece, reliability_diagram
from hpckd.metrics.classification import accuracy, entropy, nll, train_val_gap
from hpckd.metrics.ensemble import as_logprobs, ensemble_logprobs
from hpckd.metrics.evaluator import Evaluator, EvaluatorOptions
from hpckd.metrics.fidelity import independent_student_baseline, predictive_kl, top1_agreement
from hpckd.metrics.information import joint_histogram, knn_mutual_information, mutual_information
from hpckd.metrics.stats import CorrelationResult, ab_test_pvalue, correlation, normalized_accuracy
from hpckd.metrics.tstddev import TStdDev, teacher_correlation, teacher_covariance, tstddev

__all__ = [
    "CorrelationResult",
    "Evaluator",
    "EvaluatorOptions",
    "IoUAccumulator",
    "ReliabilityDiagram",
    "TStdDev",
    "ab_test_pvalue",
    "accuracy",
    "affinity",
    "affinity_seed",
    "as_logprobs",
    "attention_iou",
    "attention_rollout",
    "class_activation_maps",
    "correlation",
    "ece",
    "ensemble_logprobs",
    "entropy",
    "independent_student_baseline",
    "joint_histogram",
    "knn_mutual_information",
    "minmax_normalize",
    "mutual_information",
    "nll",
    "normalized_accuracy",
    "predictive_kl",
    "reliability_diagram",
    "resize_maps",
    "teacher_correlation",
    "teacher_covariance",
    "top1_agreement",
    "train_val_gap",
    "tstddev",
    "vit_cls_attention",
]
