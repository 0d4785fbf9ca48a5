"""The one training loop: teachers (cross-entropy) and students (any KD loss), on the DDP or DeepSpeed backend.

``run(cfg, mode)`` initialises the process group from whatever launched us (:func:`hpckd.dist.init`), builds
loaders, model, teachers, loss and backend (:mod:`hpckd.train.backends`), resumes from the newest valid checkpoint
of ``out_dir`` (``resume=auto``), trains for ``optim.epochs``, evaluates exactly (every validation sample once
across ranks) after each epoch, and writes, atomically:

* ``out_dir/checkpoints/step-XXXXXXXX(.pt)`` -- full training state after each epoch, every
  ``train.checkpoint_every`` steps, and on a preemption signal (last ``train.keep_last`` kept);
* ``out_dir/last.pt`` -- the final weights with arch and meta (what ``teachers[].checkpoint`` points at);
* ``out_dir/results.json`` -- config, metrics, history, timings, versions (the same from both backends);
* ``out_dir/log.jsonl`` -- JSON lines: start, step (loss terms, lr, images/s, memory), epoch, end events.

Exact resume: the state holds model, optimizer, scheduler, scaler, every rank's RNG and loader position and the
partial sums of the epoch, and the loaders' randomness never draws from the training RNG stream, so an interrupted
and resumed run follows the uninterrupted trajectory step for step.

Gradient accumulation: ``data.batch_size`` is the global batch of one optimizer step (the one ``optim.lr`` is for);
each rank reads micro-batches of ``batch_size / (world_size * optim.accum_steps)``. An epoch has
``floor(micro-batches / accum_steps)`` steps; a remainder of micro-batches is read but not trained on, as
``drop_last`` does for an incomplete batch.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from hpckd import dist
from hpckd.config import to_container
from hpckd.data.batch import STUDENT, Batch
from hpckd.data.batchops import apply_batch_ops
from hpckd.data.loaders import Loaders, build_loaders
from hpckd.errors import CheckpointError, ConfigError, DataError, UserError
from hpckd.io import atomic_write_json
from hpckd.losses import NonFiniteError, build_loss
from hpckd.metrics.runner import evaluate
from hpckd.models import create
from hpckd.train import rng
from hpckd.train.backends import Backend, build_backend, prepare_model
from hpckd.train.checkpoint import CheckpointStore, check_compatible, is_training_checkpoint, load_checkpoint, save_checkpoint
from hpckd.train.monitor import JsonLogger, Scalars, Throughput, memory_stats, progress
from hpckd.train.options import check_batch_split, check_runtime
from hpckd.train.precision import autocast
from hpckd.train.preempt import PreemptionGuard, hand_over

FORMAT = 1  # version of the training-state layout in checkpoints


class TrainingDiverged(UserError):
    """The loss became NaN/Inf; nothing is saved over the last good checkpoint."""


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint so a resume continues the same bookkeeping."""

    epoch: int = 0  # current epoch (== optim.epochs when finished)
    step: int = 0  # optimizer steps taken in total
    epoch_step: int = 0  # optimizer steps taken in the current epoch
    micro: int = 0  # micro-batches trained on in the current epoch (for the epoch means)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # per loss term, over this epoch's micro-batches
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # of the last evaluation
    train_s: float = 0.0
    wall_s: float = 0.0  # wall time of the run up to the last checkpoint, over all sessions
    images: int = 0  # training images seen (global)
    resumes: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state["sums"] = {k: v.detach().cpu() for k, v in self.sums.items()}
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> "Progress":
        loaded = cls(**{k: copy.deepcopy(v) for k, v in state.items()})
        loaded.sums = {k: v.to(device) for k, v in loaded.sums.items()}
        return loaded

    def add_terms(self, terms: dict[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.micro += 1

    def close_epoch(self) -> dict[str, float]:
        """Epoch means of the loss terms (one host sync per epoch), and reset for the next epoch."""
        means = {f"train_{k}": float(v) / max(self.micro, 1) for k, v in self.sums.items()}
        self.sums, self.micro, self.epoch_step = {}, 0, 0
        return means


@dataclass
class Run:
    """Everything the loop needs, built once by :func:`_build`."""

    cfg: Any
    mode: str
    info: dist.DistInfo
    out_dir: Path
    loaders: Loaders
    teachers: Any
    backend: Backend
    loss_fn: Any
    steps_per_epoch: int
    store: CheckpointStore
    logger: JsonLogger
    scalars: Scalars
    fingerprint: str
    started: float = 0.0  # this session's start (time.time())
    prior_wall_s: float = 0.0  # wall time of earlier sessions, up to the checkpoint resumed from

    def wall_s(self) -> float:
        return self.prior_wall_s + time.time() - self.started

    @property
    def accum(self) -> int:
        return int(self.cfg.optim.accum_steps)


def run(cfg, mode: str = "distill") -> dict[str, Any]:
    """Train one model. ``mode="train"``: a teacher with CE; ``mode="distill"``: a student from ``cfg.teachers``."""
    if mode == "distill" and not cfg.teachers:
        raise ConfigError("distill needs at least one entry in 'teachers' (a checkpoint written by `hpckd train`)")
    info = dist.init(cfg.dist.device)
    check_runtime(cfg, info.device)
    started = time.time()
    rng.seed_everything(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    r = _build(cfg, mode, info)
    r.started = started
    state = _resume(r)
    prog = Progress.from_state(state["progress"], info.device) if state else Progress()
    r.prior_wall_s = prog.wall_s
    if state is not None:
        prog.resumes.append({"from": state["path"], "epoch": prog.epoch, "step": prog.step, "time": round(time.time(), 3),
                             "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT")})
    _log_start(r, prog)
    # Steps after the checkpoint were logged by the session that died; they are about to be redone.
    r.scalars.start(purge_step=prog.step + 1 if state is not None else None)
    if state is not None:
        _restore_loader(r, state)
        rng.restore(state["rng"][info.rank])
    try:
        with PreemptionGuard(cfg.train.preempt_signals) as guard:
            while prog.epoch < cfg.optim.epochs:
                _train_epoch(r, prog, guard)
                _end_epoch(r, prog)
    finally:
        r.scalars.close()
    return _finish(r, prog)


# ----------------------------------------------------------------------------------------------- building


def _build(cfg, mode: str, info: dist.DistInfo) -> Run:
    out_dir = Path(cfg.out_dir)
    teacher_cfgs = list(cfg.teachers) if mode == "distill" else []
    teachers = _load_teachers([t.checkpoint for t in teacher_cfgs], info.device, cfg.serving) if teacher_cfgs else None
    check_batch_split(cfg.data.batch_size, cfg.optim.accum_steps, info.world_size)
    loaders = build_loaders(_micro_batch_cfg(cfg), info, [t.aug for t in teacher_cfgs])
    if teachers is not None:
        teachers.check_num_classes(loaders.num_classes)
    steps = len(loaders.train) // cfg.optim.accum_steps
    if steps == 0:
        raise DataError(f"an epoch has {len(loaders.train)} micro-batches per rank, fewer than optim.accum_steps="
                        f"{cfg.optim.accum_steps}; lower optim.accum_steps or data.batch_size")
    model = create(cfg.model.arch, loaders.num_classes, **cfg.model.kwargs)
    if cfg.model.weights:
        from hpckd.models import load_weights

        load_weights(model, cfg.model.weights, drop_head=cfg.model.drop_head)
    backend = build_backend(cfg, prepare_model(model, cfg, info.device), info, steps)
    warn = _warner(info, out_dir)
    logger = JsonLogger(out_dir / "log.jsonl" if info.is_main else None)
    scalars = Scalars(out_dir / "tensorboard" if info.is_main and cfg.train.tensorboard else None)
    return Run(cfg, mode, info, out_dir, loaders, teachers, backend, build_loss(_loss_cfg(cfg, mode)), steps,
               CheckpointStore(out_dir / "checkpoints", warn), logger, scalars, loaders.train_index.fingerprint())


def _micro_batch_cfg(cfg):
    """The config the loaders see: the global batch of one micro-step (``data.batch_size / accum_steps``)."""
    if cfg.optim.accum_steps == 1:
        return cfg
    micro = OmegaConf.create(to_container(cfg))
    micro.data.batch_size = cfg.data.batch_size // cfg.optim.accum_steps
    return micro


def _load_teachers(checkpoints: list[str], device, serving):
    from hpckd.teachers import ServingConfig, TeacherSet

    return TeacherSet.from_checkpoints(checkpoints, device, ServingConfig(**to_container(serving)))


def _loss_cfg(cfg, mode: str):
    if mode == "train":
        from hpckd.losses import LossConfig

        # A teacher's CE keeps the user's label smoothing and mixed-label choice (Mixup/CutMix batch ops).
        return LossConfig(name="ce", label_smoothing=cfg.loss.label_smoothing, mixed_labels=cfg.loss.mixed_labels)
    return cfg.loss


def _warner(info: dist.DistInfo, out_dir: Path):
    def warn(message: str) -> None:
        if info.is_main:
            print(f"hpckd: warning: {message}", file=sys.stderr, flush=True)
            JsonLogger(out_dir / "log.jsonl").log({"event": "warning", "message": message})

    return warn


# ----------------------------------------------------------------------------------------------- resuming


def _resume(r: Run) -> dict[str, Any] | None:
    """Load the checkpoint to continue from (or none), check it fits this run, and restore the backend."""
    cfg, info = r.cfg, r.info
    if cfg.resume == "never":
        if info.is_main:
            r.store.clear()  # a fresh start: an old trajectory must not be resumed later
        dist.barrier()
        return None
    path: Path | None = None
    if cfg.resume == "auto":
        if info.is_main:  # rank 0 decides (and warns), everybody loads the same one
            found = r.store.latest_valid()
            path = found[0].path if found else None
        path = dist.broadcast_object(path)
        if path is None:
            return None
    else:
        path = Path(cfg.resume)
    state = load_checkpoint(path)
    if not is_training_checkpoint(state):
        raise CheckpointError(f"{path} holds weights only, no training state; to start from these weights use "
                              f"model.weights={path} instead of resume=")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} has training-state format {state.get('format')}, this hpckd reads {FORMAT}; "
                              f"resume it with the hpckd version that wrote it, or start over with resume=never")
    check_compatible(path, state, to_container(cfg), info.world_size, r.backend.name, r.fingerprint)
    r.backend.load(path, state)
    state["path"] = str(path)
    return state


def _restore_loader(r: Run, state: dict[str, Any]) -> None:
    """Mid-epoch: the loader continues at the saved batch; at an epoch boundary the next epoch starts fresh."""
    progress = state["progress"]
    if progress["epoch_step"] > 0 and progress["epoch"] < r.cfg.optim.epochs:
        r.loaders.train.load_state_dict(state["loader"][r.info.rank])


# ----------------------------------------------------------------------------------------------- the loop


def _train_epoch(r: Run, prog: Progress, guard: PreemptionGuard) -> None:
    cfg, info, backend = r.cfg, r.info, r.backend
    if prog.epoch_step == 0:
        r.loaders.train.set_epoch(prog.epoch)
    backend.train()
    global_batch = cfg.data.batch_size
    meter, t0 = Throughput(), time.perf_counter()
    micro_in_epoch = prog.epoch_step * r.accum  # micro-batches of this epoch already behind us
    batches = progress(_rng_isolated(r.loaders.train), f"epoch {prog.epoch}", len(r.loaders.train) - micro_in_epoch, info.is_main)
    try:
        for batch in batches:
            if prog.epoch_step == r.steps_per_epoch:
                continue  # the remainder of micro-batches that does not fill a step (read, not trained on)
            boundary = (micro_in_epoch + 1) % r.accum == 0
            terms, stop = _micro_step(r, prog, batch, boundary, guard)
            prog.add_terms(terms)
            micro_in_epoch += 1
            if not boundary:
                continue
            lr = backend.lr()  # the rate this step uses (the scheduler moves on in step())
            backend.step()
            prog.step += 1
            prog.epoch_step += 1
            prog.images += global_batch
            meter.add(global_batch)
            if info.is_main and cfg.log_every and prog.step % cfg.log_every == 0:
                _log_step(r, prog, terms, lr, meter.rate())
                if hasattr(batches, "set_postfix"):  # the terminal's progress bar
                    batches.set_postfix(loss=f"{float(terms['loss']):.4f}", lr=f"{lr:.3g}", refresh=False)
            if stop is not None:
                _save(r, prog)
                r.logger.log({"event": "preempted", "signal": signal.Signals(stop).name, "epoch": prog.epoch,
                              "step": prog.step})
                raise hand_over(guard, stop, info.rank, cfg.train.requeue,
                                f"epoch {prog.epoch}, step {prog.step} ({r.store.folder})")
            if cfg.train.checkpoint_every and prog.step % cfg.train.checkpoint_every == 0 and prog.epoch_step < r.steps_per_epoch:
                _save(r, prog)
    finally:
        prog.train_s += time.perf_counter() - t0


def _micro_step(r: Run, prog: Progress, batch: Batch, boundary: bool, guard: PreemptionGuard):
    """Forward, loss, the all-rank check (non-finite loss? stop signal?), backward. Returns (terms, signal)."""
    backend, precision, device = r.backend, r.cfg.train.precision, r.info.device
    problem = ""
    batch = _apply_batch_ops(r, prog, batch)
    with backend.no_sync(boundary):
        with autocast(precision, device):
            teacher_logits = [t.float() for t in r.teachers(batch)] if r.teachers is not None else []
        x = batch.views[STUDENT]
        if r.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = backend.forward(x).float()
        try:
            terms = r.loss_fn(logits, teacher_logits, batch)
            if not bool(torch.isfinite(terms["loss"].detach()).all()):
                problem = f"loss is {terms['loss'].item()}"
        except NonFiniteError as exc:
            terms, problem = {}, str(exc)
        # One tiny CPU all-reduce: every rank stops together, on a bad loss anywhere or a signal to any rank
        # (the highest signal number wins, so all ranks hand over the same one). The finiteness check above reads
        # the loss on the host, so on a GPU each micro-step waits for its forward pass once (before backward is
        # queued); that keeps a NaN out of the weights and the checkpoints, at the cost of one sync per micro-step.
        bad, stop = dist.max_across_ranks([bool(problem), guard.requested or 0])
        if bad:
            where = f"epoch {prog.epoch}, step {prog.step + 1}"
            detail = problem or "a non-finite loss on another rank"
            raise TrainingDiverged(f"training diverged at {where}: {detail}; nothing was saved after the last good "
                                   f"checkpoint (lower optim.lr, or use optim.clip_grad_norm)")
        backend.backward(terms["loss"], boundary)
    return terms, (stop or None)


def _apply_batch_ops(r: Run, prog: Progress, batch: Batch) -> Batch:
    """Mixup / CutMix / CutMixPick / the augmentation study's doubled batch / the half-image split, on the device.

    The generator is seeded from (seed, epoch, step in epoch, rank), so a resumed run draws exactly what an
    uninterrupted one would, without carrying RNG state."""
    ops = r.cfg.batch_ops
    if ops.scheme == "none" and ops.half_split == "none":
        return batch
    generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence([r.cfg.seed, prog.epoch, prog.epoch_step, r.info.rank]).generate_state(1)[0]))
    data = r.cfg.data
    return apply_batch_ops(batch, ops, generator, family=data.family, mean=data.mean, std=data.std,
                           scorer=lambda pool: _pick_scores(r, pool), loss_cfg=r.cfg.loss)


@torch.no_grad()
def _pick_scores(r: Run, pool: Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(teacher ensemble logits, student logits) on a CutMixPick pool; the student only when the criterion needs it."""
    from hpckd.losses.cutmixpick import needs_student
    from hpckd.teachers.ensemble import ensemble_distribution

    with autocast(r.cfg.train.precision, r.info.device):  # scored as trained (and bf16 images need autocast)
        teacher = ensemble_distribution(r.teachers(pool)) if r.teachers is not None else None
        student = r.backend.forward(pool.views[STUDENT]).float() if needs_student(r.cfg.loss) else None
    return teacher, student


def _rng_isolated(iterable: Iterable) -> Iterator:
    """Iterate ``iterable`` with the CPU RNG forked around every ``next()``: whatever a loader draws (e.g. a
    DataLoader's worker base seed when an iterator starts) never shifts the training RNG stream, so a run resumed
    mid-epoch (new iterator) and an uninterrupted one (old iterator) see the same stream."""
    it = None
    while True:
        with torch.random.fork_rng(devices=[]):
            if it is None:
                it = iter(iterable)
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


def _end_epoch(r: Run, prog: Progress) -> None:
    """Evaluate, record the epoch, checkpoint."""
    _sync_buffers(r.backend.module)
    with _EvalForward(r.backend.module, r.cfg.train, r.info.device) as model:
        metrics = evaluate(model, r.loaders.val, r.teachers, r.loaders.num_classes, r.cfg.metrics)
    record = {"epoch": prog.epoch, **prog.close_epoch(), **{f"val_{k}": v for k, v in metrics.items()}}
    prog.history.append(record)
    prog.metrics = dict(metrics)
    prog.epoch += 1
    r.logger.log({"event": "epoch", **record, "train_s": round(prog.train_s, 3), **memory_stats(r.info.device)})
    r.scalars.add("epoch", record, prog.epoch)
    _save(r, prog)


class _EvalForward(nn.Module):
    """The bare model for evaluation, fed like in training (autocast of the training precision, channels-last
    inputs when asked), logits in fp32."""

    def __init__(self, module: nn.Module, train_cfg, device: torch.device) -> None:
        super().__init__()
        self.module, self.precision, self.device = module, train_cfg.precision, device
        self.channels_last = bool(train_cfg.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.precision, self.device):
            return self.module(x).float()

    def __enter__(self) -> "_EvalForward":
        return self

    def __exit__(self, *exc: object) -> None:
        self.module.train()


def _sync_buffers(module: nn.Module) -> None:
    """Rank 0's BatchNorm statistics everywhere (what DDP broadcasts at each forward, and what is saved), so
    evaluation on every shard uses the same model."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or dist.info().world_size == 1:
        return
    for buf in module.buffers():
        torch.distributed.broadcast(buf, src=0)


# ----------------------------------------------------------------------------------------------- saving


def _save(r: Run, prog: Progress) -> Path:
    """A full checkpoint (collective: every rank's RNG and loader state are gathered), then keep-last-N."""
    _sync_buffers(r.backend.module)
    prog.wall_s = r.wall_s()
    state = {
        **_model_meta(r, prog),
        "format": FORMAT, "backend": r.backend.name, "world_size": r.info.world_size, "trial": r.cfg.name,
        "progress": prog.state_dict(),
        "rng": dist.all_gather_object(rng.capture()),
        "loader": dist.all_gather_object(r.loaders.train.state_dict()),
    }
    path = r.backend.save(r.store, prog.step, state, r.info.is_main)
    dist.barrier()
    if r.info.is_main:
        r.store.prune(r.cfg.train.keep_last, prog.step)
        r.logger.log({"event": "checkpoint", "path": str(path), "epoch": prog.epoch, "step": prog.step})
    return path


def _model_meta(r: Run, prog: Progress) -> dict[str, Any]:
    cfg = r.cfg
    return {
        "arch": cfg.model.arch, "arch_kwargs": dict(cfg.model.kwargs), "num_classes": r.loaders.num_classes,
        "config": to_container(cfg), "epoch": prog.epoch, "step": prog.step,
        "meta": {"aug": cfg.aug, "mode": r.mode, "fingerprint": r.fingerprint, "classes": r.loaders.train_index.classes,
                 "val_acc": prog.metrics.get("accuracy"), "epoch": prog.epoch, "step": prog.step, "trial": cfg.name},
    }


# ----------------------------------------------------------------------------------------------- reporting


def _log_start(r: Run, prog: Progress) -> None:
    info = r.info
    if not info.is_main:
        return
    r.out_dir.mkdir(parents=True, exist_ok=True)
    r.logger.log({"event": "start", "mode": r.mode, "backend": r.backend.name, "precision": r.cfg.train.precision,
                  "world_size": info.world_size, "launcher": info.launcher, "device": str(info.device),
                  "train_samples": len(r.loaders.train_index), "val_samples": len(r.loaders.val_index),
                  "steps_per_epoch": r.steps_per_epoch, "resumed_from": prog.resumes[-1] if prog.resumes else None})


def _log_step(r: Run, prog: Progress, terms: dict[str, torch.Tensor], lr: float, images_per_s: float) -> None:
    values = {k: float(v.detach()) for k, v in terms.items()}
    record = {"event": "step", "step": prog.step, "epoch": prog.epoch, "lr": lr, **values,
              "images_per_s": round(images_per_s, 2), **memory_stats(r.info.device)}
    r.logger.log(record)
    r.scalars.add("train", {k: v for k, v in record.items() if k not in ("event", "step", "epoch")}, prog.step)


def _finish(r: Run, prog: Progress) -> dict[str, Any]:
    cfg, info = r.cfg, r.info
    metrics = prog.metrics
    results = {
        "name": cfg.name, "mode": r.mode, "config": to_container(cfg), "metrics": metrics, "history": prog.history,
        "timings": {"total_s": r.wall_s(), "train_s": prog.train_s,
                    "train_images_per_s": prog.images / prog.train_s if prog.train_s > 0 else None},
        "data": {"train_fingerprint": r.fingerprint, "val_fingerprint": r.loaders.val_index.fingerprint(),
                 "classes": r.loaders.train_index.classes,
                 "skipped_images": r.loaders.train_index.skipped + r.loaders.val_index.skipped},
        "world_size": info.world_size, "launcher": info.launcher, "backend": r.backend.name,
        "precision": cfg.train.precision, "steps": prog.step, "resumes": prog.resumes, "versions": versions(),
    }
    if info.is_main:
        save_checkpoint(r.out_dir / "last.pt", {**_model_meta(r, prog), "model": r.backend.module.state_dict()})
        atomic_write_json(r.out_dir / "results.json", results)
        r.logger.log({"event": "end", "val_accuracy": metrics.get("accuracy"), "steps": prog.step})
    dist.barrier()
    return results


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    for name in ("torchvision", "nvidia.dali", "numpy", "omegaconf"):
        try:
            module = __import__(name, fromlist=["__version__"])
            found[name] = getattr(module, "__version__", "?")
        except ImportError:
            pass
    try:  # metadata only: importing DeepSpeed costs seconds (and a JIT build the first time)
        found["deepspeed"] = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        pass
    return found
