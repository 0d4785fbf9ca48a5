"""Teacher-only and cross-run measurements of the studies, written to results files that reports read.

* :func:`tstddev_pass` -- T. stddev as the augmentation study measures it (Sec. 3-4, Eqs. 9-10, App. A.3): the
  teachers' probabilities over the *training* stream of a DA scheme (shuffled as in training, ``batch_ops``
  applied exactly as :class:`~hpckd.train.step.DistillStep` applies them, original plus augmented rows of the
  doubled batch), cut into groups of K rows (K = 640: five doubled steps of 64 + 64) over ``epochs`` epochs (10 in
  App. A.3), and from the same pass the rejected covariance / correlation metrics v-bar and r-bar (App. A.2,
  Eqs. 12-13: for each training batch P (rows x classes), ``mean(Cov(P, P))`` and ``mean(Cor(P, P))`` with the rows
  as variables, ``numpy.cov`` convention, averaged over batches).
* :func:`ab_test` -- the attention study's A/B test (Sec. 6.2, Eq. 9) over paired runs.
* :func:`store_normalized_accuracy` -- the response-based study's normalised accuracy (Figs. 5-6) of a run against
  its weak-only and strong-only references, stored in the run's results.json.

Rank invariance of T. stddev: each row gets its position in the 1-rank stream. The training order of every rank
comes from one global permutation per epoch dealt round-robin (:mod:`hpckd.data.sharding`), so local row ``i`` of
rank ``r`` of ``W`` at step ``s`` is global row ``i * W + r`` of that step's global batch B; x' rows follow the B
originals (``B + j * W + r``). Global position = ``(epoch * steps + s) * rows_per_step + position in the step``;
group = position // K. v-bar / r-bar use each step's *global* batch (gathered from the ranks, rows in position
order), so they do not depend on the number of ranks either. The augmented rows themselves are as rank-invariant
as the batch ops' random draws (identity doubling always is).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from hpckd import dist
from hpckd.config import BatchOpsConfig
from hpckd.data.cutmixpick import needs_student
from hpckd.data.loaders import build_loaders
from hpckd.errors import ConfigError, UserError
from hpckd.io import atomic_write_json
from hpckd.metrics.ensemble import ensemble_logprobs
from hpckd.metrics.stats import ab_test_pvalue, normalized_accuracy
from hpckd.metrics.tstddev import TStdDev
from hpckd.precision import PrecisionPolicy
from hpckd.train.build import build_teachers
from hpckd.train.experiment import section
from hpckd.train.step import DataStats, DistillStep

PAPER_GROUP = 640  # K of Eq. 9 for CIFAR-100 / Tiny ImageNet (App. A.3)
PAPER_EPOCHS = 10  # epochs of the training stream (App. A.2-A.3)


def step_positions(n_rows: int, n_original: int, doubled: bool, rank: int, world: int, global_batch: int) -> torch.Tensor:
    """(n_rows,) positions of this rank's rows inside one global step (see the module docstring)."""
    local = torch.arange(n_rows, dtype=torch.int64)
    if not doubled:
        return local * world + rank
    extra = local - n_original
    return torch.where(local < n_original, local * world + rank, global_batch + extra * world + rank)


class BatchMoments:
    """Running means over training batches of ``mean(Cov(P, P))`` and ``mean(Cor(P, P))`` (App. A.2, Eqs. 12-13),
    rows of P as variables and classes as observations (``numpy.cov`` / ``numpy.corrcoef``), float64."""

    def __init__(self) -> None:
        self.v_sum, self.r_sum, self.batches = 0.0, 0.0, 0

    def update(self, probs: torch.Tensor) -> None:
        p = probs.double()
        if p.shape[0] < 2:
            return
        self.v_sum += float(torch.cov(p).mean())
        self.r_sum += float(torch.corrcoef(p).mean())
        self.batches += 1

    def compute(self) -> dict[str, float]:
        nan = float("nan")
        n = self.batches
        return {"vbar": self.v_sum / n if n else nan, "rbar": self.r_sum / n if n else nan, "vbar_batches": float(n)}


def _gather_step(probs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """This step's global batch of probabilities, rows in position order (the local rows on 1 rank)."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return probs[positions.argsort()]
    group = dist.control_group()  # gloo: the rows travel on the host, whatever the device
    send = torch.cat([positions.double()[:, None].cpu(), probs.double().cpu()], dim=1)
    parts = [torch.empty_like(send) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, send, group=group)
    rows = torch.cat(parts)
    return rows[rows[:, 0].argsort(), 1:]


def _no_student(_x: torch.Tensor) -> torch.Tensor:
    raise ConfigError("the T. stddev pass runs teachers only")


def tstddev_pass(cfg: Any, epochs: int = PAPER_EPOCHS, group_size: int = PAPER_GROUP, unbiased: bool = True,
                 output: str | Path | None = None) -> dict[str, Any]:
    """T. stddev (augmentation study Eqs. 9-10) and v-bar / r-bar (App. A.2, Eqs. 12-13) of the teachers of ``cfg``
    over ``epochs`` epochs of its training stream (``aug``, teacher views, ``batch_ops``); the result is written
    atomically to ``output`` (default ``out_dir/tstddev.json``) by rank 0 and returned on every rank.

    ``unbiased=False`` gives the public code's ``np.var`` (ddof 0) across groups; the paper's Eq. 10 says Var.
    With several teachers the probabilities are their ensemble (``metrics.ensemble``).
    """
    if not cfg.teachers:
        raise ConfigError("tstddev needs at least one entry in 'teachers' (the teacher whose probabilities it measures)")
    if epochs < 1 or group_size < 1:
        raise ConfigError(f"tstddev needs epochs >= 1 and a group size >= 1, got {epochs} and {group_size}")
    batch_ops = section(cfg.batch_ops, BatchOpsConfig)
    if batch_ops.scheme == "cutmix_pick" and needs_student(batch_ops):
        raise ConfigError(f"batch_ops.pick_criterion={batch_ops.pick_criterion} scores with the student; T. stddev "
                          f"is teacher-only: pick a teacher criterion (e.g. t_ent)")
    info = dist.init(cfg.dist.device)
    started = time.time()
    policy = PrecisionPolicy.from_config(cfg, info.device).for_analysis(cfg.metrics.teacher_precision)
    teachers = build_teachers(cfg, info.device, policy)
    loaders = build_loaders(cfg, info, [t.aug for t in cfg.teachers])
    teachers.check_num_classes(loaders.num_classes)
    data = DataStats(cfg.data.family, list(cfg.data.mean), list(cfg.data.std))
    ops = DistillStep(_no_student, teachers, None, batch_ops, data, policy, cfg.seed, info.rank)  # type: ignore[arg-type]
    stat = TStdDev(loaders.num_classes, group_size, unbiased)
    moments = BatchMoments()
    steps = len(loaders.train)
    rows_seen = 0
    for epoch in range(epochs):
        loaders.train.set_epoch(epoch)
        for s, batch in enumerate(loaders.train):
            n_original = batch.size
            batch = ops.apply_batch_ops(batch.to(info.device), epoch, s)
            doubled = batch.doubled is not None and bool(batch.doubled.any())
            logp = ensemble_logprobs(ops.teacher_logits(batch), mode=cfg.metrics.ensemble)  # as the training step
            within = step_positions(batch.size, n_original, doubled, info.rank, info.world_size, cfg.data.batch_size)
            rows_per_step = batch.size * info.world_size
            positions = (epoch * steps + s) * rows_per_step + within
            stat.update(logp, positions.to(logp.device))
            moments.update(_gather_step(logp.exp(), within.to(logp.device)))
            rows_seen += rows_per_step
    result = {
        **stat.compute(),
        **moments.compute(),
        "group_size": group_size, "epochs": epochs, "unbiased": unbiased, "rows": rows_seen,
        "steps_per_epoch": steps, "global_batch": cfg.data.batch_size, "world_size": info.world_size,
        "aug": cfg.aug, "teacher_augs": [t.aug for t in cfg.teachers], "batch_ops": dataclasses.asdict(batch_ops),
        "teachers": [str(t.checkpoint) for t in cfg.teachers], "ensemble": cfg.metrics.ensemble,
        "teacher_precision": cfg.metrics.teacher_precision, "seed": cfg.seed,
        "train_fingerprint": loaders.train_index.fingerprint(), "wall_s": round(time.time() - started, 3),
    }
    path = Path(output) if output is not None else Path(cfg.out_dir) / "tstddev.json"
    if info.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, result)
    dist.barrier()
    result["path"] = str(path)
    return result


# ------------------------------------------------------------------------------------------------- A/B test


def _run_value(run: str | Path, key: str) -> float:
    path = Path(run)
    path = path / "results.json" if path.is_dir() else path
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise UserError(f"{path} does not exist: give finished runs (folders with results.json)") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from exc
    metrics = results.get("metrics", {})
    if key not in metrics:
        raise UserError(f"{path} has no metrics.{key}; choose one of {', '.join(sorted(metrics)) or 'nothing'}")
    return float(metrics[key])


def ab_test(control: Sequence[str | Path], treatment: Sequence[str | Path], output: str | Path,
            metric: str = "top1_agreement") -> dict[str, Any]:
    """The attention study's A/B test (Sec. 6.2, Eq. 9) over paired runs: trial i of ``control`` (vKD) pairs with
    trial i of ``treatment`` (hKD, ``batch_ops.half_split``); ``p = #{i: fidelity(hKD_i) > fidelity(vKD_i)} / Num``
    on ``metric`` of each run's results.json. Written atomically to ``output`` and returned."""
    if len(control) != len(treatment) or not control:
        raise UserError(f"the A/B test pairs runs: got {len(control)} control and {len(treatment)} treatment runs")
    a = [_run_value(r, metric) for r in control]
    b = [_run_value(r, metric) for r in treatment]
    ious = {"control_teacher_iou": [], "treatment_teacher_iou": []}
    for name, runs in (("control_teacher_iou", control), ("treatment_teacher_iou", treatment)):
        for r in runs:
            try:
                ious[name].append(_run_value(r, "teacher_iou"))
            except UserError:
                ious[name].append(None)
    result = {"metric": metric, "p_value": ab_test_pvalue(a, b), "trials": len(a), "control": a, "treatment": b,
              "treatment_higher": int(np.count_nonzero(np.asarray(b) > np.asarray(a))),
              "control_runs": [str(r) for r in control], "treatment_runs": [str(r) for r in treatment], **ious}
    atomic_write_json(Path(output), result)
    return result


def store_normalized_accuracy(run: str | Path, weak_run: str | Path, strong_run: str | Path,
                              metric: str = "accuracy") -> float:
    """``(acc - acc^-) / (acc^+ - acc^-)`` (response-based study Figs. 5-6) of ``run`` (a replacement or manipulation
    experiment) against ``weak_run`` (distilled from the weak teacher only, acc^-) and ``strong_run`` (the strong
    teacher only, acc^+), on ``metrics.<metric>`` of each results.json; stored atomically in ``run``'s results.json
    as ``normalized_accuracy`` with its references."""
    acc, weak, strong = (_run_value(r, metric) for r in (run, weak_run, strong_run))
    try:
        value = normalized_accuracy(acc, weak, strong)
    except ValueError as exc:
        raise UserError(f"{weak_run} and {strong_run}: {exc}") from exc
    path = Path(run) / "results.json" if Path(run).is_dir() else Path(run)
    results = json.loads(path.read_text())
    results["normalized_accuracy"] = {"value": value, "metric": metric, "acc": acc, "acc_minus": weak,
                                      "acc_plus": strong, "weak_run": str(weak_run), "strong_run": str(strong_run)}
    atomic_write_json(path, results)
    return value
