"""Batch operations on the device, after the loader: Mixup, CutMix, CutMixPick pools, the study's doubled batch
and the half-image split. Each records what it did on ``batch.aug`` so a logit store can replay it.

Entry point: :func:`apply_batch_ops` with a :class:`BatchOpsConfig` (embed it in the experiment config) and a
seeded ``torch.Generator``; all randomness comes from that generator.

Formulas:

- Mixup (Zhang et al., ICLR 2018, Eq. 1): ``x' = lam * x_i + (1 - lam) * x_j``, ``lam ~ Beta(alpha, alpha)``,
  j = a random permutation of the batch.
- CutMix (Yun et al., ICCV 2019, Sec. 3.1 / Alg. A1): a box of side ``(H sqrt(1 - lam), W sqrt(1 - lam))`` centred at
  a uniform pixel, clipped to the image, is pasted from x_j into x_i; ``lam`` is then corrected to the kept area,
  ``lam = 1 - box_area / (H W)`` (Eq. 2's M has exactly that many zeros).
- CutMixPick (Wang et al., NeurIPS 2022, Sec. 4.2): k CutMix runs over the batch form a pool of k*B samples; the
  pool is scored (Eq. 11) and a fraction r kept by :func:`hpckd.data.cutmixpick.select` (``batch_ops.pick_*``).
- Doubled batch (Wang et al., Sec. 4.1, Fig. 3b): the standard view x is kept and x' = scheme(x) appended;
  ``batch.doubled`` is True on the x' rows, which the ``kd_da`` loss trains with KL only.
- Half-image split (attention study, Sec. 5.3 A/B test "hKD"): each image is cut into its left and right halves,
  the left going to teacher 1 (``teacher0``) and the right to teacher 2 (``teacher1``); the student keeps the
  whole image.

Replay records on ``batch.aug`` (M = rows of x'; positions are rows of the batch before the op, ids are global
sample ids): ``aug[scheme] = {"source": (M,) rows x' was made from, "partner": (M,) rows mixed in,
"partner_index": their sample ids, "lam": (M,) weight of the source image, "box": (M, 4) (top, left, bottom, right)
pasted region, "pick": kept pool rows, "params": per-sample parameters of a follow-up policy}`` (only the keys that
apply); ``aug["half_split"] = {"mode", "column"}``.

What changes the loss is typed on the batch: ``batch.doubled`` (N,) bool marks the x' rows of a doubled batch, and
after Mixup, CutMix or CutMixPick ``batch.label_mix`` (:class:`~hpckd.data.batch.LabelMix`) gives, for every row of
the *output* batch, the label of the image mixed in and the weight of the row's own label (1.0 and the row's own
label on rows that were not mixed, e.g. the original half of a doubled batch), so a loss can train on the mixed
target ``lam y_i + (1 - lam) y_j`` (Zhang et al. 2018, Eq. 1; Yun et al. 2019, Eq. 1).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from hpckd.config.checks import at_least, choose, positive
from hpckd.config.methods import BatchOpsConfig
from hpckd.data.aug import DA_SCHEMES, followup_policy
from hpckd.data.batch import STUDENT, Batch, LabelMix
from hpckd.data.cutmixpick import CRITERIA, ORDERS, select
from hpckd.data.params import n_slots, params_from_uniforms
from hpckd.data.render_torch import render, row
from hpckd.errors import ConfigError

SCHEMES = ("none",) + DA_SCHEMES
HALF_MODES = ("none", "crop", "mask")
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)

# (teacher-ensemble logits, student logits) on a CutMixPick pool; the student's only if needs_student(cfg)
Scorer = Callable[[Batch], "tuple[torch.Tensor | None, torch.Tensor | None]"]


def validated(cfg: BatchOpsConfig) -> BatchOpsConfig:
    """Check the ``batch_ops`` section (choices and ranges, one line naming the dotted key); returns ``cfg``."""
    choose("batch_ops.scheme", cfg.scheme, SCHEMES)
    choose("batch_ops.half_split", cfg.half_split, HALF_MODES)
    positive("batch_ops.mixup_alpha", cfg.mixup_alpha, "a Beta(alpha, alpha) parameter")
    positive("batch_ops.cutmix_alpha", cfg.cutmix_alpha, "a Beta(alpha, alpha) parameter")
    choose("batch_ops.pick_criterion", cfg.pick_criterion, CRITERIA)
    choose("batch_ops.pick_order", cfg.pick_order, ORDERS)
    if not 0.0 < cfg.pick_ratio <= 1.0:
        raise ConfigError(f"config: 'batch_ops.pick_ratio' is {cfg.pick_ratio}; keep a fraction in (0, 1] of the pool")
    at_least("batch_ops.pick_pool", cfg.pick_pool, 1, "the pool needs at least 1 CutMix run")
    positive("batch_ops.pick_tau", cfg.pick_tau, "a temperature")
    return cfg


# ----------------------------------------------------------------------------------------------- random draws


def _numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded from ``generator`` (numpy has Beta; torch's Beta takes no generator)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))


def draw_partners(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of the batch rows (the mixing partner of each row)."""
    return torch.randperm(n, generator=generator)


def draw_lambda(n: int, alpha: float, generator: torch.Generator, per_sample: bool) -> torch.Tensor:
    """(n,) float32 lambdas ~ Beta(alpha, alpha): one value repeated, or one per sample."""
    lam = _numpy_rng(generator).beta(alpha, alpha, size=n if per_sample else 1)
    return torch.as_tensor(np.broadcast_to(lam, (n,)).copy(), dtype=torch.float32)


def cutmix_boxes(lam: torch.Tensor, height: int, width: int, generator: torch.Generator,
                 per_sample: bool) -> torch.Tensor:
    """(n, 4) int64 boxes (top, left, bottom, right) of CutMix: side sqrt(1 - lam) of the image, uniform centre,
    clipped to the image (Yun et al. 2019, Alg. A1)."""
    n = lam.numel()
    k = n if per_sample else 1
    ratio = torch.sqrt(1.0 - lam[:k].double())
    cut_h, cut_w = (height * ratio).long(), (width * ratio).long()
    cy = torch.randint(0, height, (k,), generator=generator)
    cx = torch.randint(0, width, (k,), generator=generator)
    top, bottom = (cy - cut_h // 2).clamp(0, height), (cy + cut_h // 2).clamp(0, height)
    left, right = (cx - cut_w // 2).clamp(0, width), (cx + cut_w // 2).clamp(0, width)
    return torch.stack([top, left, bottom, right], dim=1).expand(n, 4).clone()


def box_lambda(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Lambda corrected to the box: the fraction of the image that keeps the source pixels."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return (1.0 - area.double() / (height * width)).float()


# ------------------------------------------------------------------------------------------------ pixel ops


def mixup(x: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """lam * x + (1 - lam) * x[partner], per row."""
    w = lam.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return w * x + (1.0 - w) * x[partner.to(x.device)]


def box_mask(boxes: torch.Tensor, height: int, width: int, device: torch.device) -> torch.Tensor:
    """(n, 1, H, W) bool, True inside each row's box."""
    boxes = boxes.to(device)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_y = (rows[None, :] >= boxes[:, 0:1]) & (rows[None, :] < boxes[:, 2:3])
    in_x = (cols[None, :] >= boxes[:, 1:2]) & (cols[None, :] < boxes[:, 3:4])
    return (in_y[:, :, None] & in_x[:, None, :])[:, None]


def cutmix(x: torch.Tensor, partner: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """x with each row's box replaced by the same region of x[partner]."""
    mask = box_mask(boxes, x.shape[-2], x.shape[-1], x.device)
    return torch.where(mask, x[partner.to(x.device)], x)


def to_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the loader's normalisation: float (N, 3, H, W) -> uint8 pixels (computed in fp32: bf16 images would
    round the 0-255 scale to a few levels)."""
    x = x.float()
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return ((x * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)


def followup(x: torch.Tensor, scheme: str, params: dict[str, np.ndarray], family: str, mean: Sequence[float],
             std: Sequence[float]) -> torch.Tensor:
    """x' = scheme(x) per sample with recorded parameters (identity: an exact copy)."""
    if scheme == "identity":
        return x.clone()
    policy = followup_policy(scheme, family, x.shape[-1])
    pixels = to_uint8(x, mean, std)
    out = [render(pixels[i], policy, row(params, i), mean, std) for i in range(x.shape[0])]
    return torch.stack(out).to(x.dtype)


def draw_followup(n: int, scheme: str, family: str, size: int, generator: torch.Generator) -> dict[str, np.ndarray]:
    if scheme == "identity":
        return {}
    policy = followup_policy(scheme, family, size)
    u = torch.rand((n, n_slots(policy)), generator=generator, dtype=torch.float64).numpy()
    return params_from_uniforms(policy, u, np.array([[size, size]]))


# ------------------------------------------------------------------------------------------- batch assembly


def _append(batch: Batch, extra: dict[str, torch.Tensor], source: torch.Tensor, doubled: bool) -> Batch:
    """The batch with x' rows (``extra`` per view, made from rows ``source``) appended or substituted."""
    dev = batch.labels.device
    src = source.to(dev)
    labels, index = batch.labels[src], batch.index[src]
    valid = None if batch.valid is None else batch.valid[src]
    # The rows change, so a mixed-label record of the input no longer lines up; the mixing op sets its own.
    if not doubled:
        marker = None if batch.doubled is None else batch.doubled[src]
        return batch.replace(views=extra, labels=labels, index=index, aug=dict(batch.aug), valid=valid,
                             doubled=marker, label_mix=None)
    n, m = batch.size, int(src.numel())
    views = {k: torch.cat([batch.views[k], extra[k]]) for k in batch.views}
    marked = torch.zeros(n, dtype=torch.bool, device=dev) if batch.doubled is None else batch.doubled.to(dev)
    marker = torch.cat([marked, torch.ones(m, dtype=torch.bool, device=dev)])
    return batch.replace(views=views, labels=torch.cat([batch.labels, labels]), index=torch.cat([batch.index, index]),
                         aug=dict(batch.aug), valid=None if batch.valid is None else torch.cat([batch.valid, valid]),
                         doubled=marker, label_mix=None)


def mixed_labels(out: Batch, before: Batch, record: dict, doubled: bool) -> LabelMix:
    """Per row of ``out``: the label of the partner mixed into it and the weight ``lam`` of its own label.

    The mixed rows are the last M rows of a doubled batch, or all rows when x' replaced x; other rows get
    ``lam = 1`` and their own label (so a loss reading this record leaves them unchanged)."""
    dev = out.labels.device
    partner_label = out.labels.clone()
    lam = torch.ones(out.size, dtype=torch.float32, device=dev)
    start = before.size if doubled else 0
    rows = slice(start, start + int(record["source"].numel()))
    partner_label[rows] = before.labels[record["partner"].to(dev)]
    lam[rows] = record["lam"].to(dev, torch.float32)
    return LabelMix(partner_label=partner_label, lam=lam)


def _mix_views(batch: Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: fn(v) for k, v in batch.views.items()}


def apply_mixup(batch: Batch, cfg: BatchOpsConfig, generator: torch.Generator) -> Batch:
    n = batch.size
    partner = draw_partners(n, generator)
    lam = draw_lambda(n, cfg.mixup_alpha, generator, cfg.lam_per_sample)
    extra = _mix_views(batch, lambda x: mixup(x, partner, lam))
    out = _append(batch, extra, torch.arange(n), cfg.doubled)
    out.aug["mixup"] = _record(batch, torch.arange(n), partner, lam)
    out.label_mix = mixed_labels(out, batch, out.aug["mixup"], cfg.doubled)
    return out


def apply_cutmix(batch: Batch, cfg: BatchOpsConfig, generator: torch.Generator) -> Batch:
    n = batch.size
    h, w = batch.views[STUDENT].shape[-2:]
    partner, boxes, lam = _draw_cutmix(n, h, w, cfg, generator)
    extra = _mix_views(batch, lambda x: cutmix(x, partner, boxes))
    out = _append(batch, extra, torch.arange(n), cfg.doubled)
    out.aug["cutmix"] = _record(batch, torch.arange(n), partner, lam, boxes)
    out.label_mix = mixed_labels(out, batch, out.aug["cutmix"], cfg.doubled)
    return out


def _draw_cutmix(n: int, h: int, w: int, cfg: BatchOpsConfig, generator: torch.Generator):
    partner = draw_partners(n, generator)
    drawn = draw_lambda(n, cfg.cutmix_alpha, generator, cfg.lam_per_sample)
    boxes = cutmix_boxes(drawn, h, w, generator, cfg.lam_per_sample)
    return partner, boxes, box_lambda(boxes, h, w)


def cutmix_pool(batch: Batch, runs: int, cfg: BatchOpsConfig, generator: torch.Generator) -> tuple[Batch, dict]:
    """k CutMix runs of the batch stacked into a pool of k*B samples (CutMixPick's candidates).

    The pool is a :class:`Batch` (views, source labels and ids) ready for scoring; the dict records each pool
    row's source row, partner row, corrected lambda and box."""
    n = batch.size
    h, w = batch.views[STUDENT].shape[-2:]
    parts, sources, partners, boxes_all, lams = [], [], [], [], []
    for _ in range(runs):
        partner, boxes, lam = _draw_cutmix(n, h, w, cfg, generator)
        parts.append(_mix_views(batch, lambda x, p=partner, b=boxes: cutmix(x, p, b)))
        sources.append(torch.arange(n))
        partners.append(partner)
        boxes_all.append(boxes)
        lams.append(lam)
    source = torch.cat(sources)
    views = {k: torch.cat([p[k] for p in parts]) for k in batch.views}
    src = source.to(batch.labels.device)
    pool = batch.replace(views=views, labels=batch.labels[src], index=batch.index[src], aug={},
                         valid=None if batch.valid is None else batch.valid[src], doubled=None, label_mix=None)
    record = {"source": source, "partner": torch.cat(partners), "lam": torch.cat(lams), "box": torch.cat(boxes_all)}
    return pool, record


def apply_cutmix_pick(batch: Batch, cfg: BatchOpsConfig, generator: torch.Generator, scorer: Scorer | None) -> Batch:
    """CutMixPick: a pool of ``cfg.pick_pool`` CutMix runs, scored by ``scorer`` (teacher and, when
    :func:`~hpckd.data.cutmixpick.needs_student`, student logits on the pool), rows kept by
    :func:`hpckd.data.cutmixpick.select`."""
    if scorer is None:
        raise ConfigError("batch op cutmix_pick needs a scorer (teacher logits on the pool, and the student's for "
                          f"batch_ops.pick_criterion={cfg.pick_criterion}): distil from at least one teacher")
    pool, record = cutmix_pool(batch, int(cfg.pick_pool), cfg, generator)
    with torch.no_grad():
        teacher_logits, student_logits = scorer(pool)
    keep = select(teacher_logits, student_logits, cfg).cpu()
    extra = {k: v[keep.to(v.device)] for k, v in pool.views.items()}
    out = _append(batch, extra, record["source"][keep], cfg.doubled)
    out.aug["cutmix_pick"] = _record(batch, record["source"][keep], record["partner"][keep], record["lam"][keep],
                                     record["box"][keep], pick=keep)
    out.label_mix = mixed_labels(out, batch, out.aug["cutmix_pick"], cfg.doubled)
    return out


def apply_followup(batch: Batch, cfg: BatchOpsConfig, generator: torch.Generator, family: str,
                   mean: Sequence[float], std: Sequence[float]) -> Batch:
    """A per-sample scheme (identity, flip, flip_crop, cutout, autoaugment, randaugment) applied after x."""
    n = batch.size
    size = batch.views[STUDENT].shape[-1]
    params = draw_followup(n, cfg.scheme, family, size, generator)
    extra = {k: followup(v, cfg.scheme, params, family, mean, std) for k, v in batch.views.items()}
    out = _append(batch, extra, torch.arange(n), cfg.doubled)
    out.aug[cfg.scheme] = {"source": torch.arange(n), "params": {k: torch.as_tensor(v) for k, v in params.items()}}
    return out


def half_split(batch: Batch, mode: str, mean: Sequence[float] = DEFAULT_MEAN,
               std: Sequence[float] = DEFAULT_STD) -> Batch:
    """Left half of every image to ``teacher0``, right half to ``teacher1`` (student unchanged).

    ``crop`` gives half-width images (W // 2 and W - W // 2 columns); ``mask`` keeps the full size and paints the
    other half black (in normalised units, -mean/std), for models that need a fixed input size."""
    views = dict(batch.views)
    width = batch.views[STUDENT].shape[-1]
    column = width // 2
    left, right = batch.view("teacher0"), batch.view("teacher1")
    if mode == "crop":
        views["teacher0"], views["teacher1"] = left[..., :column], right[..., column:]
    elif mode == "mask":
        black = (-torch.as_tensor(mean, dtype=left.dtype) / torch.as_tensor(std, dtype=left.dtype)).view(1, -1, 1, 1)
        keep_left = (torch.arange(width) < column).view(1, 1, 1, -1)
        views["teacher0"] = torch.where(keep_left.to(left.device), left, black.to(left.device))
        views["teacher1"] = torch.where(keep_left.to(right.device), black.to(right.device), right)
    else:
        raise ConfigError(f"half_split {mode!r} is unknown; choose one of {', '.join(HALF_MODES)}")
    return batch.replace(views=views, aug={**batch.aug, "half_split": {"mode": mode, "column": column}})


def _record(batch: Batch, source: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor,
            boxes: torch.Tensor | None = None, pick: torch.Tensor | None = None) -> dict:
    rec = {"source": source, "partner": partner, "partner_index": batch.index[partner.to(batch.index.device)].cpu(),
           "lam": lam}
    if boxes is not None:
        rec["box"] = boxes
    if pick is not None:
        rec["pick"] = pick
    return rec


def apply_batch_ops(batch: Batch, cfg: BatchOpsConfig, generator: torch.Generator, *, family: str = "cifar",
                    mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD,
                    scorer: Scorer | None = None) -> Batch:
    """Apply the configured scheme (doubling the batch unless ``cfg.doubled`` is False), then the half split.

    ``family``, ``mean`` and ``std`` are the data config's (follow-up policies undo the normalisation to work on
    pixels); ``scorer`` is needed by ``cutmix_pick`` only."""
    cfg = validated(cfg if isinstance(cfg, BatchOpsConfig) else BatchOpsConfig(**dict(cfg)))
    if cfg.scheme == "mixup":
        batch = apply_mixup(batch, cfg, generator)
    elif cfg.scheme == "cutmix":
        batch = apply_cutmix(batch, cfg, generator)
    elif cfg.scheme == "cutmix_pick":
        batch = apply_cutmix_pick(batch, cfg, generator, scorer)
    elif cfg.scheme != "none":
        batch = apply_followup(batch, cfg, generator, family, mean, std)
    if cfg.half_split != "none":
        batch = half_split(batch, cfg.half_split, mean, std)
    return batch
