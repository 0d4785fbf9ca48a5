"""Soft-target construction of the response-based study (Sec. 4, Eqs. 1-5; Sec. 5.1), as pure functions.

All functions take *tempered* logits (z / tau) and integer labels and return target distributions (N, C).
The labelled class is k. A weak teacher t- has its soft targets replaced by a strong teacher t+'s
(Sec. 4.1) or manipulated by hand (Sec. 4.2), on a subset of samples (Fig. 4):

* ``correct``: the teacher predicts k (y^t_k > y^t_i for all i != k);
* ``reg`` (regularisation sample, after WSL): the student is more confident on k than the teacher,
  y^s_k > y^t_k (Fig. 4 caption and Sec. 4.2's "not regularized anymore, y^s_k < t"; the inline definition
  in Sec. 4.1 has a typo);
* ``reg_correct`` both, ``not_correct`` the teacher is wrong, ``all`` every sample.

Every rule keeps one distribution's shape over the non-labelled classes and sets the labelled class's
probability (:func:`with_label_prob`); the rest is rescaled to sum to 1 - y_k:

* full replacement: y = y^{t+};
* partial replacement (Eq. 1): y_k = y^{t-}_k, y_i = y^{t+}_i (1 - y^{t-}_k) / (1 - y^{t+}_k);
* confidence replacement (Eq. 2): y_k = y^{t+}_k, y_i = y^{t-}_i (1 - y^{t+}_k) / (1 - y^{t-}_k);
* label smoothing (Eq. 3): y_k = t, y_i = (1 - t) / (C - 1)  (``smoothing_form=code``: t onehot + (1 - t)/1000 as its code, any C,
  the form of the study's code);
* teacher amplification (Eq. 4): y_k = min(y^t_k + delta, 1), y_i = y^t_i (1 - y_k) / (1 - y^t_k);
* student amplification (Eq. 5): the same on the (detached) student's distribution.

Eqs. 4-5 as printed read max{y_k + delta, 1} and y_i (1 - y_k) / (1 - y_k - delta), which would not be
distributions; we implement the evident intent (cap at 1, renormalise the rest), as documented above.
The off-label distribution is a softmax over the non-labelled logits, which avoids 1 - y_k cancellation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUBSETS = ("all", "correct", "reg", "reg_correct", "not_correct")


def label_prob(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """y_k: the probability of each sample's labelled class, (N,)."""
    return probs.gather(1, labels.view(-1, 1)).squeeze(1)


def off_label_distribution(tempered_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The distribution over the non-labelled classes (sums to 1 over i != k; 0 at k)."""
    masked = tempered_logits.scatter(1, labels.view(-1, 1), float("-inf"))
    return F.softmax(masked, dim=1)


def with_label_prob(tempered_logits: torch.Tensor, labels: torch.Tensor, new_label_prob: torch.Tensor) -> torch.Tensor:
    """Target with y_k = ``new_label_prob`` and the other classes in the shape of ``sigma(tempered_logits)``."""
    rest = off_label_distribution(tempered_logits, labels) * (1.0 - new_label_prob).unsqueeze(1)
    return rest.scatter(1, labels.view(-1, 1), new_label_prob.unsqueeze(1).to(rest.dtype))


def full_replacement(weak: torch.Tensor, strong: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Full replacement (Sec. 4.1): the strong teacher's soft targets."""
    return F.softmax(strong, dim=1)


def partial_replacement(weak: torch.Tensor, strong: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Partial replacement (Eq. 1): keep the weak teacher's y_k, take the strong teacher's other classes."""
    return with_label_prob(strong, labels, label_prob(F.softmax(weak, dim=1), labels))


def confidence_replacement(weak: torch.Tensor, strong: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Confidence replacement (Eq. 2): take the strong teacher's y_k, keep the weak teacher's other classes."""
    return with_label_prob(weak, labels, label_prob(F.softmax(strong, dim=1), labels))


REPLACEMENTS = {"full": full_replacement, "partial": partial_replacement, "confidence": confidence_replacement}


CODE_SMOOTHING_CLASSES = 1000  # the response-based study's code divides by this, not by C


def label_smoothing_target(
    labels: torch.Tensor, num_classes: int, t: float, form: str = "eq3", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Label smoothing with confidence t (Eq. 3; consistent knowledge mining, Sec. 5.1, t = 0.99).

    ``eq3``: y_k = t, y_i = (1 - t) / (C - 1). ``code``: the response-based study's public code,
    ``y = t onehot + (1 - t) / 1000`` with its hard-coded 1000 (ImageNet) whatever C is, exactly as it runs: the
    target sums to ``t + C (1 - t) / 1000``, i.e. to 1 only for C = 1000.
    """
    onehot = F.one_hot(labels, num_classes).to(dtype)
    if form == "eq3":
        return onehot * t + (1.0 - onehot) * (1.0 - t) / (num_classes - 1)
    if form == "code":
        return onehot * t + (1.0 - t) / CODE_SMOOTHING_CLASSES
    raise ValueError(f"unknown smoothing form {form!r}")


def amplification(tempered_logits: torch.Tensor, labels: torch.Tensor, delta: float) -> torch.Tensor:
    """Teacher / student amplification (Eqs. 4-5): y_k <- min(y_k + delta, 1), the rest renormalised."""
    p_k = label_prob(F.softmax(tempered_logits, dim=1), labels)
    return with_label_prob(tempered_logits, labels, torch.clamp(p_k + delta, max=1.0))


def subset_mask(
    subset: str, teacher_tempered: torch.Tensor, student_tempered: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """(N,) bool: the samples a replacement/manipulation applies to (Fig. 4; see the module docstring)."""
    if subset == "all":
        return torch.ones_like(labels, dtype=torch.bool)
    correct = teacher_tempered.argmax(dim=1) == labels
    if subset == "correct":
        return correct
    if subset == "not_correct":
        return ~correct
    reg = label_prob(F.softmax(student_tempered, dim=1), labels) > label_prob(
        F.softmax(teacher_tempered, dim=1), labels
    )
    if subset == "reg":
        return reg
    if subset == "reg_correct":
        return reg & correct
    raise ValueError(f"unknown subset {subset!r}; choose one of {', '.join(SUBSETS)}")
