"""Batch operations on the device, after the loader: Mixup, CutMix, CutMixPick pools, the study's doubled batch
and the half-image split. Each records what it did on ``batch.aug`` so a logit store can replay it.

Entry point: :func:`apply_batch_ops` with a :class:`BatchOpsConfig` (embed it in the experiment config) and the
source of its random draws: :class:`KeyedDraws` in training (world-size invariant, see below), or a seeded
``torch.Generator`` (one group spanning the batch; unit tests).

World-size invariance (what a logit store needs): the rows of a global micro-batch are cut into
``batch_ops.mix_groups`` = G groups by global position modulo G (rank r of W holds positions r, r + W, ...; with
G a multiple of W a group never straddles two ranks). Partners are drawn within a group, and a group's draws
(partner permutation, lambdas, box centres) come from a generator keyed by (seed, epoch, op, first sample id of
the group, run); per-sample follow-up parameters are counter-based uniforms keyed by (seed, epoch, scheme,
sample id) (:mod:`hpckd.data.rand`). So the mixes of a sample are the same for every world size W dividing G and
every rank, and a resumed run redraws them without state. ``aug["variant"]`` (N,) int64 numpy array names each
output row for a logit store: 0 = the loader's view, 1 + j = made by run j of the op (CutMixPick pools have
``pick_pool`` runs, their rows ``POOL_VARIANT + j`` while scored; the other ops one run).

Host and device (issue 17: no avoidable device sync per micro-step): the draws, the row choices and the sample ids
stay on the host. The ops read the ids from ``batch.ids()`` (the loader's host copy, :attr:`Batch.host_index`),
keep ``host_index`` in step with every reordering of ``index`` (using the host row numbers they chose), and move
their host-made tensors (rows, lambdas, boxes) to the device with asynchronous copies from pinned memory. So
Mixup, CutMix and the half split never read the device, nor does the bookkeeping of the follow-up schemes (their
per-sample pixel ops may: RandAugment's equalize reads a histogram). CutMixPick's kept pool rows are chosen on the
device, from the teachers' scores; it builds its output there too (views, labels, ids, markers, mixed labels and
the kept rows' replay record are device gathers) and hands the teachers' pool logits of the kept rows on
(:class:`~hpckd.data.batch.KnownLogits`: the kept rows *are* pool rows, every view included), so neither the
kept rows' host ids nor a second teacher pass or store read is needed (:func:`teacher_logits_after_ops`): no
device read. Its output then has no ``host_index`` and device-tensor variants (:meth:`Batch.ids` /
:meth:`Batch.variants` read them back for callers off the hot path). With a half split after it the teachers see
half images, not the pool's, so CutMixPick reads the kept rows once (one ``Tensor.cpu``, all groups together) to
give the kept rows host ids and variants, and the teachers run (or the store is read) on the whole output batch.

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
sample ids; all on the host, CPU tensors): ``aug[scheme] = {"source": (M,) rows x' was made from, "partner": (M,)
rows mixed in, "partner_index": their sample ids, "lam": (M,) weight of the source image, "box": (M, 4) (top,
left, bottom, right) pasted region, "pick": kept pool rows, "params": per-sample parameters of a follow-up
policy}`` (only the keys that apply); ``aug["half_split"] = {"mode", "column"}``; ``aug["variant"]`` as above.
CutMixPick without a half split keeps its record's kept rows (and its ``aug["variant"]``) as device tensors.

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
from hpckd.data.batch import STUDENT, Batch, KnownLogits, LabelMix, host_array
from hpckd.data.cutmixpick import CRITERIA, ORDERS, select
from hpckd.data.params import n_slots, params_from_uniforms, stream_id
from hpckd.data.rand import uniforms
from hpckd.data.render_torch import render, row
from hpckd.errors import ConfigError

SCHEMES = ("none",) + DA_SCHEMES
POOL_VARIANT = 64  # aug["variant"] of CutMixPick pool row of run j: POOL_VARIANT + j (its kept rows: 1 + j)
HALF_MODES = ("none", "crop", "mask")
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)

# (teacher-ensemble logits, student logits) on a CutMixPick pool, the student's only if needs_student(cfg), and
# optionally a third item: each teacher's own logits on the pool (a list), which the kept rows then reuse
Scorer = Callable[[Batch], tuple]
TeacherRun = Callable[[Batch], "list[torch.Tensor]"]


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
    at_least("batch_ops.mix_groups", cfg.mix_groups, 1, "rows mix within groups of the global batch")
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


class GroupRng:
    """The draws of one mixing group, in a fixed order: permutation, lambdas, box centres."""

    def permutation(self, m: int) -> np.ndarray: ...
    def beta(self, alpha: float, size: int) -> np.ndarray: ...
    def integers(self, high: int, size: int) -> np.ndarray: ...


class _TorchGroupRng(GroupRng):
    """A torch generator's stream, drawing exactly what the single-group code always drew (unit tests)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def permutation(self, m: int) -> np.ndarray:
        return draw_partners(m, self.generator).numpy()

    def beta(self, alpha: float, size: int) -> np.ndarray:
        return _numpy_rng(self.generator).beta(alpha, alpha, size=size)

    def integers(self, high: int, size: int) -> np.ndarray:
        return torch.randint(0, high, (size,), generator=self.generator).numpy()


class _NumpyGroupRng(GroupRng):
    def __init__(self, key: list[int]) -> None:
        self.rng = np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in key]))

    def permutation(self, m: int) -> np.ndarray:
        return self.rng.permutation(m)

    def beta(self, alpha: float, size: int) -> np.ndarray:
        return self.rng.beta(alpha, alpha, size=size)

    def integers(self, high: int, size: int) -> np.ndarray:
        return self.rng.integers(0, high, size=size)


class Draws:
    """Where the batch ops' randomness comes from: the mixing groups of a batch and their generators."""

    def groups(self, n: int) -> list[np.ndarray]:
        """Rows of each mixing group (ascending), covering 0..n-1."""
        raise NotImplementedError

    def group_rng(self, op: str, ids: np.ndarray, run: int) -> GroupRng:
        """The generator of the group whose sample ids (in row order) are ``ids``, for run ``run`` of ``op``."""
        raise NotImplementedError

    def uniforms(self, op: str, ids: np.ndarray, slots: int) -> np.ndarray:
        """(len(ids), slots) uniforms of per-sample parameters."""
        raise NotImplementedError


class GeneratorDraws(Draws):
    """One group spanning the batch, every draw from one torch generator (in the order of the original code)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.rng = _TorchGroupRng(generator)

    def groups(self, n: int) -> list[np.ndarray]:
        return [np.arange(n)]

    def group_rng(self, op: str, ids: np.ndarray, run: int) -> GroupRng:
        return self.rng

    def uniforms(self, op: str, ids: np.ndarray, slots: int) -> np.ndarray:
        return torch.rand((len(ids), slots), generator=self.rng.generator, dtype=torch.float64).numpy()


class KeyedDraws(Draws):
    """World-size-invariant draws (see the module docstring): rank ``rank`` of ``world`` holds the global
    positions ``rank + world * i`` of each micro-batch; group = position mod ``groups`` (``world`` divides it)."""

    def __init__(self, seed: int, epoch: int, rank: int = 0, world: int = 1, groups: int = 8) -> None:
        check_mix_groups(groups, world)
        self.seed, self.epoch, self.rank, self.world, self.n_groups = int(seed), int(epoch), rank, world, groups

    def groups(self, n: int) -> list[np.ndarray]:
        residue = (self.rank + self.world * np.arange(n)) % self.n_groups
        return [np.flatnonzero(residue == g) for g in np.unique(residue)]

    def group_rng(self, op: str, ids: np.ndarray, run: int) -> GroupRng:
        return _NumpyGroupRng([self.seed, self.epoch, stream_id(f"batch_ops.{op}"), int(ids[0]), run])

    def uniforms(self, op: str, ids: np.ndarray, slots: int) -> np.ndarray:
        return uniforms((self.seed, self.epoch, stream_id(f"batch_ops.{op}")), np.asarray(ids, np.int64), slots)


def check_mix_groups(groups: int, world: int) -> None:
    """One line when the mixing groups would straddle ranks (``world`` must divide ``batch_ops.mix_groups``)."""
    if groups % world:
        raise ConfigError(f"config: 'batch_ops.mix_groups' is {groups}, not a multiple of the world size {world}; "
                          f"use a multiple of {world} (e.g. {world * max(1, -(-groups // world))})")


def as_draws(source: torch.Generator | Draws) -> Draws:
    return source if isinstance(source, Draws) else GeneratorDraws(source)


def draw_mix(n: int, ids: np.ndarray, draws: Draws, op: str, alpha: float, per_sample: bool, run: int = 0,
             hw: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Partner rows (n,), lambdas (n,) and, for CutMix (``hw`` given), boxes (n, 4), drawn group by group: a
    partner is a random row of the same group; one lambda (and box size) per group unless ``per_sample``."""
    partner = torch.arange(n)
    lam = torch.ones(n, dtype=torch.float32)
    boxes = torch.zeros((n, 4), dtype=torch.int64) if hw is not None else None
    for rows in draws.groups(n):
        m = len(rows)
        rng = draws.group_rng(op, ids[rows], run)
        members = torch.as_tensor(rows, dtype=torch.int64)
        partner[members] = members[torch.as_tensor(rng.permutation(m), dtype=torch.int64)]
        drawn = rng.beta(alpha, m if per_sample else 1)
        lam[members] = torch.as_tensor(np.broadcast_to(drawn, (m,)).copy(), dtype=torch.float32)
        if hw is not None:
            k = m if per_sample else 1
            h, w = hw
            ratio = torch.sqrt(1.0 - lam[members][:k].double())
            cut_h, cut_w = (h * ratio).long(), (w * ratio).long()
            cy = torch.as_tensor(rng.integers(h, k), dtype=torch.int64)
            cx = torch.as_tensor(rng.integers(w, k), dtype=torch.int64)
            top, bottom = (cy - cut_h // 2).clamp(0, h), (cy + cut_h // 2).clamp(0, h)
            left, right = (cx - cut_w // 2).clamp(0, w), (cx + cut_w // 2).clamp(0, w)
            boxes[members] = torch.stack([top, left, bottom, right], dim=1).expand(m, 4)
    if hw is not None:
        lam = box_lambda(boxes, *hw)
    return partner, lam, boxes


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


def draw_followup(ids: np.ndarray, scheme: str, family: str, size: int, draws: Draws) -> dict[str, np.ndarray]:
    if scheme == "identity":
        return {}
    policy = followup_policy(scheme, family, size)
    u = draws.uniforms(scheme, ids, n_slots(policy))
    return params_from_uniforms(policy, u, np.array([[size, size]]))


# ------------------------------------------------------------------------------------------- batch assembly


def to_device(t: torch.Tensor | np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor (or array) on ``device``: on CUDA an asynchronous copy from pinned memory (a copy from pageable
    memory may wait for the device queue); elsewhere a plain ``to``."""
    t = torch.as_tensor(t)
    if dtype is not None:
        t = t.to(dtype)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _append(batch: Batch, extra: dict[str, torch.Tensor], source: np.ndarray, doubled: bool,
            variant: np.ndarray | None = None) -> Batch:
    """The batch with x' rows (``extra`` per view, made from the rows ``source`` (host int64); ``variant`` of each,
    default 1) appended or substituted. ``host_index`` follows ``index`` with the same host rows."""
    source = np.asarray(source, np.int64)
    variant = np.ones(len(source), np.int64) if variant is None else np.asarray(variant, np.int64)
    return _with_rows(batch, extra, to_device(source, batch.labels.device), batch.ids()[source], variant, doubled)


def _append_kept(batch: Batch, extra: dict[str, torch.Tensor], kept: torch.Tensor, doubled: bool) -> Batch:
    """CutMixPick's output built on the device: the pool rows ``kept`` (a device tensor; pool row ``run * n + i``
    was made from row i by run ``run``) appended (``doubled``) or substituted, with labels, ids, validity and
    markers gathered on the device. No host ids for the kept rows (``host_index`` None) and the variants
    ``1 + run`` as a device tensor: nothing here waits for the device."""
    kept, n = kept.to(batch.labels.device), batch.size
    return _with_rows(batch, extra, kept % n, None, 1 + torch.div(kept, n, rounding_mode="floor"), doubled)


def _with_rows(batch: Batch, extra: dict[str, torch.Tensor], src: torch.Tensor, host: np.ndarray | None,
               variant: np.ndarray | torch.Tensor, doubled: bool) -> Batch:
    """The batch with x' rows (``extra`` per view, made from the rows ``src``, on the device) appended
    (``doubled``) or substituted. ``host``: the new rows' host ids, with ``variant`` on the host too; None when
    they are only on the device (the output then has no ``host_index`` and ``variant`` is a device tensor)."""
    dev = batch.labels.device
    labels, index = batch.labels[src], batch.index[src]
    valid = None if batch.valid is None else batch.valid[src]
    # The rows change, so a mixed-label record of the input no longer lines up; the mixing op sets its own.
    if not doubled:
        marker = None if batch.doubled is None else batch.doubled.to(dev)[src]
        return batch.replace(views=extra, labels=labels, index=index, host_index=host,
                             aug={**batch.aug, "variant": variant}, valid=valid, doubled=marker, label_mix=None)
    n, m = batch.size, int(src.numel())
    views = {k: torch.cat([batch.views[k], extra[k]]) for k in batch.views}
    marked = torch.zeros(n, dtype=torch.bool, device=dev) if batch.doubled is None else batch.doubled.to(dev)
    marker = torch.cat([marked, torch.ones(m, dtype=torch.bool, device=dev)])
    if host is None:
        host_index, variants = None, torch.cat([to_device(batch.variants(), dev), variant])
    else:
        host_index, variants = np.concatenate([batch.ids(), host]), np.concatenate([batch.variants(), variant])
    return batch.replace(views=views, labels=torch.cat([batch.labels, labels]), index=torch.cat([batch.index, index]),
                         host_index=host_index, aug={**batch.aug, "variant": variants},
                         valid=None if batch.valid is None else torch.cat([batch.valid, valid]),
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
    partner_label[rows] = before.labels[to_device(record["partner"], dev)]
    lam[rows] = to_device(record["lam"], dev, torch.float32)
    return LabelMix(partner_label=partner_label, lam=lam)


def _mix_views(batch: Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: fn(v) for k, v in batch.views.items()}


def apply_mixup(batch: Batch, cfg: BatchOpsConfig, generator: torch.Generator | Draws) -> Batch:
    n = batch.size
    partner, lam, _ = draw_mix(n, batch.ids(), as_draws(generator), "mixup", cfg.mixup_alpha, cfg.lam_per_sample)
    dev = batch.views[STUDENT].device
    on_dev = to_device(partner, dev), to_device(lam, dev)  # once for every view
    extra = _mix_views(batch, lambda x: mixup(x, *on_dev))
    out = _append(batch, extra, np.arange(n), cfg.doubled)
    out.aug["mixup"] = _record(batch, torch.arange(n), partner, lam)
    out.label_mix = mixed_labels(out, batch, out.aug["mixup"], cfg.doubled)
    return out


def apply_cutmix(batch: Batch, cfg: BatchOpsConfig, generator: torch.Generator | Draws) -> Batch:
    n = batch.size
    h, w = batch.views[STUDENT].shape[-2:]
    partner, boxes, lam = _draw_cutmix(batch, h, w, cfg, as_draws(generator), "cutmix", 0)
    dev = batch.views[STUDENT].device
    on_dev = to_device(partner, dev), to_device(boxes, dev)  # once for every view
    extra = _mix_views(batch, lambda x: cutmix(x, *on_dev))
    out = _append(batch, extra, np.arange(n), cfg.doubled)
    out.aug["cutmix"] = _record(batch, torch.arange(n), partner, lam, boxes)
    out.label_mix = mixed_labels(out, batch, out.aug["cutmix"], cfg.doubled)
    return out


def _draw_cutmix(batch: Batch, h: int, w: int, cfg: BatchOpsConfig, draws: Draws, op: str, run: int):
    partner, lam, boxes = draw_mix(batch.size, batch.ids(), draws, op, cfg.cutmix_alpha, cfg.lam_per_sample, run,
                                   (int(h), int(w)))
    return partner, boxes, lam


def cutmix_pool(batch: Batch, runs: int, cfg: BatchOpsConfig,
                generator: torch.Generator | Draws) -> tuple[Batch, dict]:
    """k CutMix runs of the batch stacked into a pool of k*B samples (CutMixPick's candidates).

    The pool is a :class:`Batch` (views, source labels and ids) ready for scoring; the dict records each pool
    row's source row, partner row, corrected lambda and box."""
    n = batch.size
    h, w = batch.views[STUDENT].shape[-2:]
    parts, sources, partners, boxes_all, lams = [], [], [], [], []
    draws = as_draws(generator)
    dev = batch.views[STUDENT].device
    for run in range(runs):
        partner, boxes, lam = _draw_cutmix(batch, h, w, cfg, draws, "cutmix_pick", run)
        on_dev = to_device(partner, dev), to_device(boxes, dev)
        parts.append(_mix_views(batch, lambda x, p=on_dev: cutmix(x, *p)))
        sources.append(torch.arange(n))
        partners.append(partner)
        boxes_all.append(boxes)
        lams.append(lam)
    source = torch.cat(sources)
    views = {k: torch.cat([p[k] for p in parts]) for k in batch.views}
    src = to_device(np.tile(np.arange(n), runs), batch.labels.device)
    variant = np.repeat(POOL_VARIANT + np.arange(runs, dtype=np.int64), n)
    pool = batch.replace(views=views, labels=batch.labels[src], index=batch.index[src],
                         host_index=np.tile(batch.ids(), runs), aug={"variant": variant},
                         valid=None if batch.valid is None else batch.valid[src], doubled=None, label_mix=None)
    record = {"source": source, "partner": torch.cat(partners), "lam": torch.cat(lams), "box": torch.cat(boxes_all),
              "variant": variant}
    return pool, record


def apply_cutmix_pick(batch: Batch, cfg: BatchOpsConfig, generator: torch.Generator | Draws,
                      scorer: Scorer | None, reuse: bool = True) -> Batch:
    """CutMixPick: a pool of ``cfg.pick_pool`` CutMix runs, scored by ``scorer`` (teacher and, when
    :func:`~hpckd.data.cutmixpick.needs_student`, student logits on the pool), rows kept by
    :func:`hpckd.data.cutmixpick.select`.

    ``reuse`` (no half split follows): the output is built on the device without reading which rows were kept
    (module docstring), and when the scorer gave each teacher's pool logits the kept rows' are set on the output
    (``known_logits``) for :func:`teacher_logits_after_ops`. Otherwise (a half split follows: the teachers will
    see other images than the pool's) the kept rows are read once, so that they get host ids and variants."""
    if scorer is None:
        raise ConfigError("batch op cutmix_pick needs a scorer (teacher logits on the pool, and the student's for "
                          f"batch_ops.pick_criterion={cfg.pick_criterion}): distil from at least one teacher")
    draws = as_draws(generator)
    n = batch.size
    pool, record = cutmix_pool(batch, int(cfg.pick_pool), cfg, draws)
    with torch.no_grad():
        scored = scorer(pool)
    teacher_logits, student_logits = scored[0], scored[1]
    per_teacher = scored[2] if len(scored) > 2 else None
    kept = _select_per_group(teacher_logits, student_logits, cfg, draws.groups(n), n)  # on the scores' device
    extra = {k: v[kept.to(v.device)] for k, v in pool.views.items()}
    if reuse:
        out = _append_kept(batch, extra, kept, cfg.doubled)
        out.aug["cutmix_pick"] = _kept_record(batch, record, kept)
        if per_teacher:
            out.known_logits = KnownLogits([t[kept.to(t.device)] for t in per_teacher],
                                           head=batch if cfg.doubled else None)
    else:
        keep = kept.cpu()  # the one device read of the half-split path: host ids and variants of the kept rows
        rows = host_array(keep)
        # Pool row run * n + i was made from row i (cutmix_pool), so its source row is rows % n.
        out = _append(batch, extra, rows % n, cfg.doubled, record["variant"][rows] - POOL_VARIANT + 1)
        out.aug["cutmix_pick"] = _record(batch, record["source"][keep], record["partner"][keep],
                                         record["lam"][keep], record["box"][keep], pick=keep)
    out.label_mix = mixed_labels(out, batch, out.aug["cutmix_pick"], cfg.doubled)
    return out


def _kept_record(batch: Batch, record: dict, kept: torch.Tensor) -> dict:
    """The replay record of the kept pool rows ``kept`` (a device tensor), gathered on the device from the pool's
    host record: one copy of an int64 table (source, partner, partner id, box) and one of the lambdas."""
    dev = kept.device
    partner_index = torch.from_numpy(batch.ids())[record["partner"]]
    table = torch.cat([record["source"][:, None], record["partner"][:, None], partner_index[:, None],
                       record["box"]], dim=1)
    rows = to_device(table, dev)[kept]
    return {"source": rows[:, 0], "partner": rows[:, 1], "partner_index": rows[:, 2],
            "lam": to_device(record["lam"], dev, torch.float32)[kept], "box": rows[:, 3:7], "pick": kept}


def teacher_logits_after_ops(batch: Batch, run: TeacherRun) -> list[torch.Tensor]:
    """The teachers' logits of a batch the batch ops made, ``run`` being the teachers (or a logit store): on the
    whole batch, except where the batch carries the logits of its trailing rows (``batch.known_logits``,
    CutMixPick's kept pool rows): ``run`` then sees only ``known_logits.head`` (the original rows of a doubled
    batch, nothing when the kept rows replace the batch), and each teacher's logits are the head's followed by
    the known ones (a device concatenation)."""
    known = batch.known_logits
    if known is None:
        return run(batch)
    if known.head is None:
        return list(known.logits)
    head = run(known.head)
    return [torch.cat([h, k.to(h.device)]) for h, k in zip(head, known.logits)]


def _select_per_group(teacher: torch.Tensor | None, student: torch.Tensor | None, cfg: BatchOpsConfig,
                      groups: list[np.ndarray], n: int) -> torch.Tensor:
    """CutMixPick's selection within each mixing group (pool row ``run * n + i`` belongs to row i's group), so
    what is kept does not depend on the other groups, i.e. on the world size. The kept pool rows stay on the
    scores' device (the caller brings them to the host once, for all groups)."""
    if len(groups) == 1:
        return select(teacher, student, cfg)
    runs = int(cfg.pick_pool)
    scores = teacher if teacher is not None else student
    per_group = [(np.arange(runs)[:, None] * n + rows[None, :]).reshape(-1) for rows in groups]
    all_rows = to_device(np.concatenate(per_group), scores.device)  # one copy for every group
    keep = []
    for pool_rows in all_rows.split([len(r) for r in per_group]):
        part = select(None if teacher is None else teacher[pool_rows],
                      None if student is None else student[pool_rows], cfg)
        keep.append(pool_rows[part])
    return torch.cat(keep)


def apply_followup(batch: Batch, cfg: BatchOpsConfig, generator: torch.Generator | Draws, family: str,
                   mean: Sequence[float], std: Sequence[float]) -> Batch:
    """A per-sample scheme (identity, flip, flip_crop, cutout, autoaugment, randaugment) applied after x."""
    n = batch.size
    size = batch.views[STUDENT].shape[-1]
    params = draw_followup(batch.ids(), cfg.scheme, family, size, as_draws(generator))
    extra = {k: followup(v, cfg.scheme, params, family, mean, std) for k, v in batch.views.items()}
    out = _append(batch, extra, np.arange(n), cfg.doubled)
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
        views["teacher0"] = torch.where(to_device(keep_left, left.device), left, to_device(black, left.device))
        views["teacher1"] = torch.where(to_device(keep_left, right.device), to_device(black, right.device), right)
    else:
        raise ConfigError(f"half_split {mode!r} is unknown; choose one of {', '.join(HALF_MODES)}")
    return batch.replace(views=views, aug={**batch.aug, "half_split": {"mode": mode, "column": column}})


def _record(batch: Batch, source: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor,
            boxes: torch.Tensor | None = None, pick: torch.Tensor | None = None) -> dict:
    # The partners' ids from the host copy (``partner`` is a host tensor): no device read.
    rec = {"source": source, "partner": partner, "partner_index": torch.from_numpy(batch.ids())[partner], "lam": lam}
    if boxes is not None:
        rec["box"] = boxes
    if pick is not None:
        rec["pick"] = pick
    return rec


def apply_batch_ops(batch: Batch, cfg: BatchOpsConfig, generator: torch.Generator | Draws, *, family: str = "cifar",
                    mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD,
                    scorer: Scorer | None = None) -> Batch:
    """Apply the configured scheme (doubling the batch unless ``cfg.doubled`` is False), then the half split.

    ``family``, ``mean`` and ``std`` are the data config's (follow-up policies undo the normalisation to work on
    pixels); ``scorer`` is needed by ``cutmix_pick`` only. ``generator``: :class:`KeyedDraws` (training) or a
    torch generator (one group spanning the batch). The teachers' logits of the result:
    :func:`teacher_logits_after_ops`."""
    cfg = validated(cfg if isinstance(cfg, BatchOpsConfig) else BatchOpsConfig(**dict(cfg)))
    if cfg.scheme == "mixup":
        batch = apply_mixup(batch, cfg, generator)
    elif cfg.scheme == "cutmix":
        batch = apply_cutmix(batch, cfg, generator)
    elif cfg.scheme == "cutmix_pick":
        # The kept rows' teacher logits are the pool's only if the teachers see the pool's images: not after a
        # half split (which gives them half images).
        batch = apply_cutmix_pick(batch, cfg, generator, scorer, reuse=cfg.half_split == "none")
    elif cfg.scheme != "none":
        batch = apply_followup(batch, cfg, generator, family, mean, std)
    if cfg.half_split != "none":
        batch = half_split(batch, cfg.half_split, mean, std)
    return batch
