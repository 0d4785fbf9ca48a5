"""The one evaluation path: the per-epoch evaluation of a run and ``hpckd eval`` build their loader, model and
teachers through the same functions (:mod:`hpckd.train.build`, :func:`hpckd.data.loaders.build_eval_loader`) and
run the same pass (:func:`evaluate`).

The metrics themselves are pure functions and the streaming :class:`~hpckd.metrics.evaluator.Evaluator`; this
module feeds them: student logits, the teacher ensemble's distribution and, with two or more CNN or ViT teachers,
the IoU of teacher 0's and teacher 1's attention maps (attention study Eq. 1, App. A.7), which come through the
teacher interface's capabilities (:meth:`~hpckd.teachers.source.TeacherSource.cam_features`,
:class:`~hpckd.teachers.source.AttentionSource`); a source that can (:class:`~hpckd.teachers.source.OnePassMapSource`,
inline teachers) gives the CAM features or ViT attention maps from the same forward pass as the logits, so each
teacher runs once per batch (a ViT's logits are those of its unchanged forward, so the metrics are the same with and
without maps). Teachers run at ``metrics.teacher_precision`` and, under
``batch_ops.half_split`` (hKD), see the half images they saw in training. docs/metrics.md lists every metric.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

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
from hpckd.data.batchops import DEFAULT_MEAN, DEFAULT_STD
from hpckd.data.batchops import half_split as split_halves
from hpckd.metrics.attention import (
    IoUAccumulator,
    attention_rollout,
    class_activation_maps,
    resize_maps,
    vit_cls_attention,
)
from hpckd.metrics.checks import evaluator_options
from hpckd.metrics.ensemble import ensemble_logprobs
from hpckd.metrics.evaluator import Evaluator
from hpckd.models import apply_state_dict, create
from hpckd.precision import PrecisionPolicy
from hpckd.teachers.source import AttentionSource, OnePassMapSource, TeacherSource
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
def evaluate(model: nn.Module, loader, teachers: TeacherSource | None, num_classes: int, metrics_cfg, *,
             half_split: str = "none", mean: Sequence[float] = DEFAULT_MEAN,
             std: Sequence[float] = DEFAULT_STD, reliability: dict[str, Any] | None = None) -> dict[str, float]:
    """Exact metrics over the whole split: sufficient statistics are all-reduced across ranks.

    ``reliability``: a dict to fill with the reliability-diagram bins of the student (and of the teachers' ensemble,
    when there are teachers) as :meth:`~hpckd.metrics.calibration.ReliabilityDiagram.as_dict` (the bins behind
    ECE, attention study Fig. A.4). Collective: pass it on every rank or on none.

    With two or more teachers whose first two have attention maps on this rank, also the IoU of teacher 0's and
    teacher 1's maps (attention study Eq. 1) as ``teacher_iou`` (mean of per-image IoUs), ``teacher_iou_pooled``
    and ``teacher_iou_batch_pooled``: class activation maps for CNNs (``metrics.cam_target``), the CLS attention or
    its rollout for ViTs (``metrics.vit_attention``, App. A.7), thresholded at ``metrics.cam_threshold`` in
    ``metrics.cam_iou_form`` at ``metrics.cam_size``.

    Teachers run at ``metrics.teacher_precision`` (fp32 by default). ``half_split`` (``batch_ops.half_split`` of
    the run, the attention study's hKD, Sec. 6.2) gives the teachers the half images they saw in training, for
    their logits and their maps; the student keeps the whole image.
    """
    model.eval()
    evaluator = Evaluator(num_classes, evaluator_options(metrics_cfg))
    kinds = _map_kinds(teachers, metrics_cfg)
    iou = None
    if kinds is not None:
        form = metrics_cfg.cam_iou_form
        iou = IoUAccumulator(threshold=metrics_cfg.cam_threshold, form=form)
    # Teachers whose CAM or attention maps come out of the forward that gives their logits (one pass per teacher
    # and batch); a source without that capability runs them again for their maps.
    one_pass = isinstance(teachers, OnePassMapSource) and kinds is not None
    cam_ks = [k for k in (0, 1) if one_pass and kinds[k] == "cam"]  # type: ignore[index]
    vit_ks = [k for k in (0, 1) if one_pass and kinds[k] == "vit"]  # type: ignore[index]
    with _analysis_precision(teachers, metrics_cfg.teacher_precision):
        for batch in loader:
            logits = model(batch.views[STUDENT])
            teacher = None
            cams: dict[int, Any] = {}
            attentions: dict[int, list[torch.Tensor]] = {}
            if teachers is not None:
                if half_split != "none":
                    batch = split_halves(batch, half_split, mean, std)
                if one_pass:
                    teacher_logits, cams, attentions = teachers.logits_and_maps(  # type: ignore[union-attr]
                        batch, cams=cam_ks, attentions=vit_ks)
                else:
                    teacher_logits = teachers(batch)
                teacher = ensemble_logprobs(teacher_logits, mode=metrics_cfg.ensemble)
            evaluator.update(logits, batch.labels, teacher_logits=teacher, valid=batch.valid)
            if iou is not None:
                size = tuple(batch.views[STUDENT].shape[-2:])
                iou.size = size if metrics_cfg.cam_size == "input" or metrics_cfg.cam_iou_form == "code" else None
                maps = [_teacher_map(teachers, batch, k, kinds[k], metrics_cfg, cams.get(k), attentions.get(k))
                        for k in (0, 1)]
                if half_split == "crop":
                    maps = [in_frame(m, k, batch.aug["half_split"]["column"], size) for k, m in enumerate(maps)]
                iou.update(maps[0], maps[1], valid=batch.valid)
    metrics = evaluator.compute()
    if reliability is not None:
        reliability.update({name: diagram.as_dict() for name, diagram in evaluator.reliability().items()})
    if iou is not None:
        metrics.update({f"teacher_{k}": v for k, v in iou.compute().items()})
    return metrics


@contextlib.contextmanager
def _analysis_precision(teachers: TeacherSource | None, teacher_precision: str) -> Iterator[None]:
    """Teachers that run models (they carry a :class:`PrecisionPolicy`) run at ``metrics.teacher_precision`` for the
    pass; training's policy comes back afterwards. A logit store replays what it stored."""
    policy = getattr(teachers, "precision", None)
    if not isinstance(policy, PrecisionPolicy):
        yield
        return
    teachers.precision = policy.for_analysis(teacher_precision)  # type: ignore[union-attr]
    try:
        yield
    finally:
        teachers.precision = policy  # type: ignore[union-attr]


def _map_kinds(teachers: TeacherSource | None, metrics_cfg) -> list[str] | None:
    """How teachers 0 and 1 give an attention map on this rank ("cam" for CNNs with a GAP + linear head, "vit" for
    attention layers), or None when teacher IoU does not apply (fewer than 2 teachers, VGG's MLP head, a logit
    store that cannot build its teachers inline, ``metrics.attention_iou=false``)."""
    if teachers is None or not metrics_cfg.attention_iou or len(teachers) < 2:
        return None
    kinds = []
    for k in (0, 1):
        if teachers.has_cam_features(k):
            kinds.append("cam")
        elif isinstance(teachers, AttentionSource) and teachers.has_attention_maps(k):
            kinds.append("vit")
        else:
            return None
    return kinds


def _teacher_map(teachers: TeacherSource, batch, index: int, kind: str, metrics_cfg, cam: Any = None,
                 blocks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Teacher ``index``'s attention map on ``batch``; ``cam`` / ``blocks``: its CAM ingredients / per-block attention
    probabilities when the logits' forward already gave them (:class:`~hpckd.teachers.source.OnePassMapSource`),
    else a second pass of the teacher computes them here."""
    if kind == "vit":
        if blocks is None:
            blocks = teachers.attention_maps(batch, index)  # type: ignore[attr-defined]
        if metrics_cfg.vit_attention == "rollout":
            return attention_rollout(blocks)
        return vit_cls_attention(blocks[-1])
    features, weight, bias = cam if cam is not None else teachers.cam_features(batch, index)
    return class_activation_maps(features, weight, bias, target=metrics_cfg.cam_target, labels=batch.labels)


def in_frame(maps: torch.Tensor, side: int, column: int, size: tuple[int, int]) -> torch.Tensor:
    """A half image's (N, h, w) maps placed in the whole image's frame ``size``: upsampled (bilinear) onto its
    half (side 0: columns ``[0, column)``, side 1: ``[column, W)``), the other half at the map's minimum, so after
    min-max normalisation the region can only lie where the teacher looked (hKD, ``batch_ops.half_split=crop``)."""
    height, width = size
    cols = column if side == 0 else width - column
    part = resize_maps(maps.double(), (height, cols))
    low = part.reshape(part.shape[0], -1).min(dim=1).values.view(-1, 1, 1)
    frame = low.expand(part.shape[0], height, width).clone()
    if side == 0:
        frame[..., :column] = part
    else:
        frame[..., column:] = part
    return frame


def evaluate_checkpoint(path: str | Path, split: str = "val", augmented: bool = False,
                        overrides: Sequence[str] = (), against: Sequence[str | Path] = ()) -> dict[str, Any]:
    """``hpckd eval``: every metric of a checkpoint on a split, stored in its run's ``results.json``.

    The run's config comes from the checkpoint (dotted ``overrides`` apply on top, e.g. ``data.root=...``).
    ``augmented`` evaluates on the split under the run's training policy (:func:`student_policy`, the same function
    training uses, crop choice included) with the dataset's fixed Affinity seed (the shared D'_val of the
    attention study, Eq. 5); once both the clean and the augmented pass of a split are stored, their Affinity is
    stored too. Teachers of the config (if any) give the fidelity metrics.

    ``against``: checkpoints that stand in for the teachers (their ensemble, if several), e.g. another student for
    the fidelity study's independent-student baseline (Sec. 3.2): top-1 agreement and predictive KL between two
    students; stored under ``{split}_vs_{name}`` (name: the checkpoint's folder) so the run's own results stay.
    """
    state = load_checkpoint(path)
    if against:
        listed = ", ".join(f"{{checkpoint: '{Path(p)}'}}" for p in against)
        overrides = [*overrides, f"teachers=[{listed}]"]
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
    teachers = build_teachers(cfg, info.device, policy, inline=True) if cfg.teachers else None
    with EvalForward(model, policy) as forward:
        # models compared with --against see whole images; the run's own teachers see what they saw in training
        split_mode = "none" if against else cfg.batch_ops.half_split
        metrics = evaluate(forward, loader, teachers, state["num_classes"], cfg.metrics,
                           half_split=split_mode, mean=cfg.data.mean, std=cfg.data.std)
    key = f"{split}_augmented" if augmented else split
    if against:
        key += "_vs_" + "+".join(Path(p).resolve().parent.name for p in against)
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
    if "train" in stored and "val" in stored:  # the attention study's Acc-Gap (Table 3), exact post-hoc passes
        stored["acc_gap"] = stored["train"]["accuracy"] - stored["val"]["accuracy"]
    atomic_write_json(results_path, results)
