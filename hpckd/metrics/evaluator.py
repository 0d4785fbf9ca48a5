"""One streaming evaluation pass: every per-sample metric of the four studies from sufficient statistics.

The :class:`Evaluator` keeps only sums, counts and histograms (int64; float quantities in exact fixed point, see
:mod:`hpckd.metrics.exact`), so memory does not grow with the number of samples, and ``compute()`` all-reduces
them over torch.distributed: N ranks holding disjoint parts of a split give bit-identical results to 1 rank.
Samples with ``valid == False`` (loader padding) never count.

Formulas: accuracy and NLL (fidelity study Sec. 3.2), ECE (attention study Eq. 13), entropy (attention study
Eq. 12), top-1 agreement and predictive KL (fidelity study Eq. 2-3), mutual information (attention study Eq. 4),
T. stddev (augmentation study Eq. 9-10).
"""

from __future__ import annotations

import dataclasses

import torch

from hpckd.config.schema import EvaluatorOptions
from hpckd.metrics.calibration import (
    WEIGHTINGS,
    ReliabilityDiagram,
    confidence_and_correct,
    confidence_bins,
    diagram_from_sums,
)
from hpckd.metrics.classification import entropy, nll
from hpckd.metrics.ensemble import as_logprobs
from hpckd.metrics.exact import all_reduce_int64, fixed_sum, from_fixed, to_fixed
from hpckd.metrics.fidelity import KL_DIRECTIONS, kl_per_sample
from hpckd.metrics.information import joint_histogram, knn_mutual_information, mutual_information_from_joint
from hpckd.metrics.tstddev import TStdDev

MI_ESTIMATORS: tuple[str, ...] = ("split", "per_batch")
FIDELITY_REDUCTIONS: tuple[str, ...] = ("sample", "batch")


def check_options(options: EvaluatorOptions) -> EvaluatorOptions:
    """``options`` with ``topk`` as a tuple of ints; ValueError naming the first bad choice or range."""
    options = dataclasses.replace(options, topk=tuple(int(k) for k in options.topk))
    checks = [
        (options.ece_weighting in WEIGHTINGS, f"ece_weighting must be one of {WEIGHTINGS}"),
        (options.kl_direction in KL_DIRECTIONS, f"kl_direction must be one of {KL_DIRECTIONS}"),
        (options.mi_estimator in MI_ESTIMATORS, f"mi_estimator must be one of {MI_ESTIMATORS}"),
        (options.fidelity_reduction in FIDELITY_REDUCTIONS, f"fidelity_reduction must be one of {FIDELITY_REDUCTIONS}"),
        (options.n_bins >= 1, "n_bins must be >= 1"),
        (options.kl_temperature > 0, "kl_temperature must be > 0"),
        (all(k >= 1 for k in options.topk), "topk entries must be >= 1"),
        (options.kl_scale > 0, "kl_scale must be > 0"),
        (options.tstddev_group_size is None or options.tstddev_group_size >= 1, "tstddev_group_size must be >= 1"),
        (options.tstddev_rows_per_position >= 1, "tstddev_rows_per_position must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"EvaluatorOptions: {message}")
    return options


class Evaluator:
    """Streaming, all-reducing evaluator of a student (and optionally its teacher ensemble) over a split.

    Usage::

        ev = Evaluator(num_classes=100)
        for batch in loader:
            ev.update(student(batch.view("student")), batch.labels, teacher_logits=t, valid=batch.valid)
        results = ev.compute()          # collective: call on every rank

    ``teacher_logits`` is ONE (N, C) tensor: the ensemble's logits or log-probabilities (build it with
    :func:`hpckd.metrics.ensemble.ensemble_logprobs`). Results (floats): ``count``, ``accuracy``,
    ``accuracy_top{k}``, ``nll``, ``entropy``, ``ece``, and with teacher logits ``teacher_accuracy``,
    ``teacher_nll``, ``teacher_entropy``, ``teacher_ece``, ``top1_agreement``, ``predictive_kl``,
    ``mutual_information``, ``mutual_information_mm`` (Miller-Madow), ``mutual_information_knn`` with
    ``mi_knn``, plus ``tstddev`` / ``tstddev_groups`` when enabled. ``fidelity_reduction="batch"`` makes
    ``top1_agreement`` and ``predictive_kl`` means of per-``update`` means (the studies' code). If any counted
    student or teacher row had non-finite values, the float metrics are NaN.
    """

    def __init__(self, num_classes: int, options: EvaluatorOptions | None = None, **kwargs: object) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if options is not None and kwargs:
            raise ValueError("pass either an EvaluatorOptions or keyword options, not both")
        self.num_classes = num_classes
        self.options = check_options(options if options is not None else EvaluatorOptions(**kwargs))  # type: ignore[arg-type]
        self.reset()

    # ----------------------------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget everything seen so far."""
        c, m = self.num_classes, self.options.n_bins
        shapes = {
            "count": (), "nonfinite": (), "nll": (), "entropy": (),
            "bin_count": (m,), "bin_correct": (m,), "bin_conf": (m,),
            "t_count": (), "t_nonfinite": (), "t_correct": (), "t_nll": (), "t_entropy": (),
            "t_bin_count": (m,), "t_bin_correct": (m,), "t_bin_conf": (m,),
            "agree": (), "kl": (), "joint": (c, c), "mi_batch_sum": (), "mi_batches": (),
            "agree_batch_sum": (), "kl_batch_sum": (), "pair_batches": (), "mi_knn_sum": (), "mi_knn_batches": (),
        }  # fmt: skip
        shapes.update({f"correct_top{k}": () for k in self.options.topk})
        self._state = {name: torch.zeros(shape, dtype=torch.int64) for name, shape in shapes.items()}
        self._tstddev = (
            TStdDev(
                c,
                self.options.tstddev_group_size,
                self.options.tstddev_unbiased,
                self.options.tstddev_rows_per_position,
            )
            if self.options.tstddev_group_size
            else None
        )

    def _add(self, name: str, value: torch.Tensor) -> None:
        slot = self._state[name]
        if slot.device != value.device:
            self._state = {k: v.to(value.device) for k, v in self._state.items()}
            slot = self._state[name]
        slot += value.to(torch.int64)

    # ---------------------------------------------------------------------------------------------- update
    @torch.no_grad()
    def update(
        self,
        student_logits: torch.Tensor,
        labels: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> None:
        """Add one batch. ``valid`` (bool (N,)) masks padding; ``positions`` only feeds T. stddev grouping."""
        if student_logits.dim() != 2 or student_logits.shape[1] != self.num_classes:
            raise ValueError(f"student logits must be (N, {self.num_classes}), got {tuple(student_logits.shape)}")
        if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} must match student {tuple(student_logits.shape)}"
            )
        if self._tstddev is not None and teacher_logits is not None:
            self._tstddev.update(teacher_logits.detach(), positions, valid)
        keep = None if valid is None else valid.to(student_logits.device).bool()
        select = (lambda x: x) if keep is None else (lambda x: x[keep])  # noqa: E731
        s = select(student_logits.detach())
        y = select(labels.to(student_logits.device)).long()
        log_s = as_logprobs(s)
        self._update_model("", s, log_s, y)
        if teacher_logits is not None:
            t = select(teacher_logits.detach().to(student_logits.device))
            log_t = as_logprobs(t)
            self._update_model("t_", t, log_t, y)
            self._update_pair(t, s)

    def _update_model(self, prefix: str, logits: torch.Tensor, logp: torch.Tensor, labels: torch.Tensor) -> None:
        n = logits.shape[0]
        self._add(prefix + "count", torch.tensor(n, device=logits.device))
        self._add(prefix + "nonfinite", _broken_rows(logits).sum())
        self._add(prefix + "nll", fixed_sum(nll(logp, labels, reduction="none")))  # type: ignore[arg-type]
        self._add(prefix + "entropy", fixed_sum(entropy(logp, reduction="none")))  # type: ignore[arg-type]
        conf, correct = confidence_and_correct(logp, labels)
        idx = confidence_bins(conf, self.options.n_bins)
        m = self.options.n_bins
        self._add(prefix + "bin_count", torch.bincount(idx, minlength=m))
        self._add(prefix + "bin_correct", torch.bincount(idx[correct], minlength=m))
        bin_conf = torch.zeros(m, dtype=torch.int64, device=logits.device).index_add_(0, idx, to_fixed(conf))
        self._add(prefix + "bin_conf", bin_conf)
        if prefix:
            self._add("t_correct", correct.sum())
            return
        for k in self.options.topk:
            kk = min(k, self.num_classes)
            hit = correct if k == 1 else (logits.topk(kk, dim=-1).indices == labels[:, None]).any(dim=-1)
            self._add(f"correct_top{k}", hit.sum())

    def _update_pair(self, teacher: torch.Tensor, student: torch.Tensor) -> None:
        o = self.options
        t_pred, s_pred = teacher.argmax(dim=-1), student.argmax(dim=-1)
        agree = t_pred == s_pred
        self._add("agree", agree.sum())
        kl = kl_per_sample(teacher, student, o.kl_direction, o.kl_temperature)  # type: ignore[arg-type]
        self._add("kl", fixed_sum(kl))
        joint = joint_histogram(t_pred, s_pred, self.num_classes)
        self._add("joint", joint)
        one = torch.tensor(1, device=teacher.device)
        if t_pred.numel() == 0:
            return
        if o.fidelity_reduction == "batch":
            # The studies' code: a mean per batch, then the mean of those means over batches.
            self._add("agree_batch_sum", to_fixed(agree.double().mean()))
            self._add("kl_batch_sum", to_fixed(kl.mean()))
            self._add("pair_batches", one)
        if o.mi_estimator == "per_batch":
            self._add("mi_batch_sum", to_fixed(torch.tensor(mutual_information_from_joint(joint), dtype=torch.float64)))
            self._add("mi_batches", one)
        if o.mi_knn:
            value = knn_mutual_information(t_pred, s_pred)
            self._add("mi_knn_sum", to_fixed(torch.tensor(value, dtype=torch.float64, device=teacher.device)))
            self._add("mi_knn_batches", one)

    # --------------------------------------------------------------------------------------------- compute
    def reduced_state(self, group: object | None = None) -> dict[str, torch.Tensor]:
        """The sufficient statistics summed over all ranks (a collective call; identity on 1 rank)."""
        return all_reduce_int64(self._state, group)

    def compute(self, group: object | None = None) -> dict[str, float]:
        """All metrics as floats, identical on every rank (a collective call when distributed)."""
        st = {k: v.cpu() for k, v in self.reduced_state(group).items()}
        out = self._model_metrics(st, "")
        if int(st["nonfinite"]) > 0:
            out = _nan_except(out, ("count",))
        if int(st["t_count"]) > 0:
            teacher = {**self._model_metrics(st, "t_"), **self._pair_metrics(st)}
            out.update(_nan_except(teacher, ()) if int(st["nonfinite"]) + int(st["t_nonfinite"]) > 0 else teacher)
        if self._tstddev is not None:
            out.update(self._tstddev.compute(group))
        return out

    def _model_metrics(self, st: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
        n = int(st[prefix + "count"])
        name = "teacher_" if prefix else ""
        if n == 0:
            return {"count": 0.0}
        diagram = diagram_from_sums(
            st[prefix + "bin_count"], st[prefix + "bin_correct"], from_fixed(st[prefix + "bin_conf"])
        )
        out = {
            f"{name}nll": float(from_fixed(st[prefix + "nll"])) / n,
            f"{name}entropy": float(from_fixed(st[prefix + "entropy"])) / n,
            f"{name}ece": diagram.ece(self.options.ece_weighting),  # type: ignore[arg-type]
        }
        if prefix:
            out["teacher_accuracy"] = int(st["t_correct"]) / n
            return out
        out["count"] = float(n)
        for k in self.options.topk:
            out["accuracy" if k == 1 else f"accuracy_top{k}"] = int(st[f"correct_top{k}"]) / n
        return out

    def _pair_metrics(self, st: dict[str, torch.Tensor]) -> dict[str, float]:
        n = int(st["t_count"])
        joint = st["joint"]
        if self.options.mi_estimator == "per_batch":
            batches = int(st["mi_batches"])
            mi = float(from_fixed(st["mi_batch_sum"])) / batches if batches else float("nan")
        else:
            mi = mutual_information_from_joint(joint)
        agreement, kl = int(st["agree"]) / n, float(from_fixed(st["kl"])) / n
        if self.options.fidelity_reduction == "batch":
            batches = int(st["pair_batches"])
            agreement = float(from_fixed(st["agree_batch_sum"])) / batches if batches else float("nan")
            kl = float(from_fixed(st["kl_batch_sum"])) / batches if batches else float("nan")
        out = {
            "top1_agreement": agreement,
            "predictive_kl": self.options.kl_scale * kl,
            "mutual_information": mi,
            "mutual_information_mm": mutual_information_from_joint(joint, miller_madow=True),
        }
        if self.options.mi_knn:
            batches = int(st["mi_knn_batches"])
            out["mutual_information_knn"] = float(from_fixed(st["mi_knn_sum"])) / batches if batches else float("nan")
        return out

    def reliability(self, group: object | None = None) -> dict[str, ReliabilityDiagram]:
        """Reliability-diagram bins of the student (and teacher, if seen), reduced over ranks (collective)."""
        st = {k: v.cpu() for k, v in self.reduced_state(group).items()}
        out = {"student": diagram_from_sums(st["bin_count"], st["bin_correct"], from_fixed(st["bin_conf"]))}
        if int(st["t_count"]) > 0:
            out["teacher"] = diagram_from_sums(st["t_bin_count"], st["t_bin_correct"], from_fixed(st["t_bin_conf"]))
        return out


def _broken_rows(logits: torch.Tensor) -> torch.Tensor:
    """(N,) bool: rows with NaN or +inf, or all -inf. A -inf entry alone is a legitimate zero probability
    (e.g. in ensemble log-probabilities) and does not break a row."""
    return torch.isnan(logits).any(dim=-1) | torch.isposinf(logits).any(dim=-1) | torch.isneginf(logits).all(dim=-1)


def _nan_except(metrics: dict[str, float], keep: tuple[str, ...]) -> dict[str, float]:
    # A NaN/inf output poisons its sums; report NaN rather than a silently wrong number.
    return {k: (v if k in keep else float("nan")) for k, v in metrics.items()}


def option_names() -> list[str]:
    """Names of the Evaluator's keyword options (for config validation by callers)."""
    return [f.name for f in dataclasses.fields(EvaluatorOptions)]
