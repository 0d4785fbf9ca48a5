"""The one training loop: teachers (cross-entropy) and students (any KD loss), on the DDP or DeepSpeed backend.

``run(cfg, mode)`` initialises the process group from whatever launched us (:func:`hpckd.dist.init`), locks
``out_dir`` (rank 0 holds :class:`~hpckd.runlock.RunLock` for the run's lifetime), builds loaders, the teacher
source, the student, its precision policy, the backend (:mod:`hpckd.train.backends`) and the step object
(:class:`~hpckd.train.step.DistillStep`), resumes from the newest valid checkpoint of ``out_dir``
(``resume=auto``), trains for ``optim.epochs``, evaluates exactly after each epoch (:mod:`hpckd.train.evaluation`),
and writes, atomically:

* ``out_dir/checkpoints/step-XXXXXXXX(.pt)`` -- full training state after each epoch, every
  ``train.checkpoint_every`` steps, and on a preemption signal (last ``train.keep_last`` kept);
* ``out_dir/last.pt`` -- the final weights with arch and meta (what ``teachers[].checkpoint`` points at);
* ``out_dir/results.json`` -- config, metrics, history, timings, versions (the same from both backends);
* ``out_dir/log.jsonl`` -- JSON lines: start, step (loss terms, lr, images/s, memory), epoch, end events.

A checkpoint never holds a non-finite parameter or buffer: the state is checked on every rank before each save
and before each evaluation; a run whose state is no longer finite has diverged, whatever its loss says
(:class:`TrainingDiverged`), and its last good checkpoint is kept. ``resume_changes=[optim.lr]`` restarts from it
with another learning rate.

Host syncs (the hot path): a micro-step never waits for the device. Each one queues its loss and a non-finite flag
on the device (:class:`~hpckd.train.step.FiniteWatch`); the loop reads them, and every rank agrees on them and on a
preemption signal (one small CPU all-reduce), only at check points: every :data:`CHECK_EVERY` optimizer steps, at
each log record, before each checkpoint (preemption included), at the end of each epoch (so before ``last.pt``),
and before the first backward of a session. A non-finite loss therefore stops the run at the next check point with
the step where it first appeared; what the steps in between computed never leaves the process (no checkpoint,
evaluation, log record or ``last.pt`` is written from it). With fused SGD/AdamW (``optim.fused``, the DDP backend
without fp16's scaler) a step whose gradients hold NaN/Inf is skipped on the device, so the weights in memory never
hold NaN either, and such a step also stops the run at the next check point (:func:`hpckd.train.optim.finite_step_gate`);
otherwise the weights in memory may hold NaN until then.
With one process a preemption signal is seen at the next optimizer step (no collective needed); with several, at
the next check point.

Exact resume: the state holds model, optimizer, scheduler, scaler, every rank's RNG and loader position and the
partial sums of the epoch, and the loaders' randomness never draws from the training RNG stream, so an interrupted
and resumed run follows the uninterrupted trajectory step for step.

Gradient accumulation: ``data.batch_size`` is the global batch of one optimizer step (the one ``optim.lr`` is for);
each rank reads micro-batches of ``batch_size / (world_size * optim.accum_steps)``. An epoch has
``floor(micro-batches / accum_steps)`` steps; a remainder of micro-batches is read but not trained on, as
``drop_last`` does for an incomplete batch.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from omegaconf import OmegaConf
from torch import nn

from hpckd import dist
from hpckd.checkpoint import (
    CheckpointStore,
    check_compatible,
    is_training_checkpoint,
    load_checkpoint,
    nonfinite_entries,
    save_checkpoint,
)
from hpckd.config import BatchOpsConfig, LossConfig, to_container
from hpckd.data.loaders import Loaders, build_loaders
from hpckd.errors import CheckpointError, ConfigError, DataError, UserError
from hpckd.io import atomic_write_json, check_output_dir
from hpckd.losses import Loss, build_loss
from hpckd.precision import PrecisionPolicy
from hpckd.runlock import RunLock
from hpckd.teachers.source import TeacherSource
from hpckd.train import rng
from hpckd.train.backends import Backend, build_backend, prepare_model
from hpckd.train.build import build_student, build_teachers
from hpckd.train.evaluation import EvalForward, evaluate
from hpckd.train.experiment import section
from hpckd.train.monitor import JsonLogger, Scalars, Throughput, memory_stats, progress
from hpckd.train.options import check_batch_split, check_runtime
from hpckd.train.optim import scaled_lr
from hpckd.train.preempt import PreemptionGuard, hand_over
from hpckd.train.progress import Progress
from hpckd.train.step import DataStats, DistillStep, Finding, FiniteWatch
from hpckd.train.training_metrics import train_counts, train_metrics

FORMAT = 1  # version of the training-state layout in checkpoints
# Optimizer steps between two check points of the deferred finiteness flags (besides log records, checkpoints and
# epoch ends): how far a diverged run can go before it stops, and how late several ranks agree on a preemption signal
# (16 steps of a 32 ms step are half a second; SLURM warns 90 s ahead).
CHECK_EVERY = 16


class TrainingDiverged(UserError):
    """The loss or the model state became NaN/Inf; nothing was saved after the last good checkpoint."""


@dataclass(frozen=True)
class StepContext:
    """What a hook sees before each micro-step: the epoch, the optimizer steps taken so far, and the number of
    this micro-step in the current session (1-based)."""

    epoch: int
    step: int
    micro: int


Hook = Callable[[StepContext], None]
_PROCESS_HOOKS: list[Hook] = []  # hooks for every run of this process (see register_hook)


def register_hook(hook: Hook) -> None:
    """Call ``hook`` before every micro-step of every run in this process, for code that cannot pass ``hooks`` to
    :func:`run` (a job entry point that then calls the ``hpckd`` command, e.g. to inject a fault in a test)."""
    _PROCESS_HOOKS.append(hook)


@dataclass
class Run:
    """Everything the loop needs, built once by :func:`_build`."""

    cfg: Any
    mode: str
    info: dist.DistInfo
    out_dir: Path
    loaders: Loaders
    teachers: TeacherSource | None
    backend: Backend
    step: DistillStep
    policy: PrecisionPolicy
    steps_per_epoch: int
    store: CheckpointStore
    logger: JsonLogger
    scalars: Scalars
    fingerprint: str
    hooks: Sequence[Hook] = ()
    started: float = 0.0  # this session's start (time.time())
    prior_wall_s: float = 0.0  # wall time of earlier sessions, up to the checkpoint resumed from
    session_micro: int = 0  # micro-steps run in this session (for hooks)
    watch: FiniteWatch = field(default_factory=FiniteWatch)  # this window's deferred finiteness flags
    log_every: int = 0  # cfg.log_every and cfg.train.checkpoint_every, read once (the loop asks every step)
    checkpoint_every: int = 0
    reliability: dict[str, Any] = field(default_factory=dict)  # the last evaluation's reliability bins (report)

    def __post_init__(self) -> None:
        self.log_every, self.checkpoint_every = int(self.cfg.log_every), int(self.cfg.train.checkpoint_every)
        self.accum_steps = int(self.cfg.optim.accum_steps)

    def wall_s(self) -> float:
        return self.prior_wall_s + time.time() - self.started

    @property
    def accum(self) -> int:
        return self.accum_steps


def run(cfg, mode: str = "distill", hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Train one model. ``mode="train"``: a teacher with CE; ``mode="distill"``: a student from ``cfg.teachers``.

    ``hooks`` are called before every micro-step with a :class:`StepContext` (progress displays, fault injection
    in tests)."""
    if mode == "distill" and not cfg.teachers:
        raise ConfigError("distill needs at least one entry in 'teachers' (a checkpoint written by `hpckd train`)")
    info = dist.init(cfg.dist.device)
    check_runtime(cfg, info.device)
    with _locked_out_dir(Path(cfg.out_dir), info):
        return _run(cfg, mode, info, [*_PROCESS_HOOKS, *hooks])


@contextlib.contextmanager
def _locked_out_dir(out_dir: Path, info: dist.DistInfo) -> Iterator[None]:
    """Rank 0 checks ``out_dir`` and holds its lock for the run; every rank fails together (one line) when it
    cannot, instead of the other ranks waiting in a collective for a rank that left."""
    with contextlib.ExitStack() as stack:
        problem = None
        if info.is_main:
            try:
                check_output_dir(out_dir)
                stack.enter_context(RunLock(out_dir))
            except UserError as exc:
                problem = exc
        message = dist.broadcast_object(None if problem is None else str(problem))
        if problem is not None:
            raise problem
        if message is not None:
            raise UserError(message)
        yield


def _run(cfg, mode: str, info: dist.DistInfo, hooks: Sequence[Hook]) -> dict[str, Any]:
    started = time.time()
    rng.seed_everything(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    r = _build(cfg, mode, info, hooks)
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
        if "train_counts" in state:  # the progress dict holds rank 0's; every rank continues its own
            prog.train_counts = dict(state["train_counts"][info.rank])
    try:
        with PreemptionGuard(cfg.train.preempt_signals) as guard:
            while prog.epoch < cfg.optim.epochs:
                _train_epoch(r, prog, guard)
                _end_epoch(r, prog)
    finally:
        r.scalars.close()
    return _finish(r, prog)


# ----------------------------------------------------------------------------------------------- building


def _build(cfg, mode: str, info: dist.DistInfo, hooks: Sequence[Hook]) -> Run:
    out_dir = Path(cfg.out_dir)
    policy = PrecisionPolicy.from_config(cfg, info.device)
    teacher_cfgs = list(cfg.teachers) if mode == "distill" else []
    teachers = build_teachers(cfg, info.device, policy) if teacher_cfgs else None
    check_batch_split(cfg.data.batch_size, cfg.optim.accum_steps, info.world_size)
    loaders = build_loaders(_micro_batch_cfg(cfg), info, [t.aug for t in teacher_cfgs])
    if teachers is not None:
        teachers.check_num_classes(loaders.num_classes)
    steps = len(loaders.train) // cfg.optim.accum_steps
    if steps == 0:
        raise DataError(f"an epoch has {len(loaders.train)} micro-batches per rank, fewer than optim.accum_steps="
                        f"{cfg.optim.accum_steps}; lower optim.accum_steps or data.batch_size")
    model = build_student(cfg, loaders.num_classes)
    backend = build_backend(cfg, prepare_model(model, cfg, info.device), info, steps, policy)
    data = DataStats(cfg.data.family, list(cfg.data.mean), list(cfg.data.std))
    step = DistillStep(backend.forward, teachers, _loss(cfg, mode), section(cfg.batch_ops, BatchOpsConfig), data,
                       policy, cfg.seed, info.rank, deferred_checks=True)
    warn = _warner(info, out_dir)
    logger = JsonLogger(out_dir / "log.jsonl" if info.is_main else None)
    scalars = Scalars(out_dir / "tensorboard" if info.is_main and cfg.train.tensorboard else None)
    store = CheckpointStore(out_dir / "checkpoints", warn)
    if info.is_main:
        store.remove_stale_temp_files()
    return Run(cfg, mode, info, out_dir, loaders, teachers, backend, step, policy, steps, store, logger, scalars,
               loaders.train_index.fingerprint(), hooks)


def _loss(cfg, mode: str) -> Loss:
    if mode == "train":
        # A teacher's CE keeps the user's label smoothing and mixed-label choice (Mixup/CutMix batch ops).
        return build_loss(LossConfig(name="ce", label_smoothing=cfg.loss.label_smoothing,
                                     mixed_labels=cfg.loss.mixed_labels))
    return build_loss(cfg.loss)


def _micro_batch_cfg(cfg):
    """The config the loaders see: the global batch of one micro-step (``data.batch_size / accum_steps``)."""
    if cfg.optim.accum_steps == 1:
        return cfg
    micro = OmegaConf.create(to_container(cfg))
    micro.data.batch_size = cfg.data.batch_size // cfg.optim.accum_steps
    return micro


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
            _discard_previous_run(r)
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
    allowed = set(cfg.resume_changes)
    check_compatible(path, state, to_container(cfg), info.world_size, r.backend.name, r.fingerprint, allowed)
    r.backend.load(path, state)
    if any(key.startswith("optim.") for key in allowed):
        # The restored optimizer holds the rate the old settings gave the next step; recompute it (and the base
        # rate) from the changed ones, so the very first resumed step already uses them.
        r.backend.reset_lr(scaled_lr(cfg.optim, cfg.data.batch_size)[0])
    state["path"] = str(path)
    return state


def _discard_previous_run(r: Run) -> None:
    """``resume=never``: say what goes, then move the previous run's outputs aside together and delete them, so a
    kill half-way never leaves an old ``last.pt`` or ``results.json`` beside the new run's checkpoints."""
    old = [p for p in (r.out_dir / "results.json", r.out_dir / "last.pt", r.out_dir / "log.jsonl",
                       r.out_dir / "tensorboard") if p.exists()]
    checkpoints = r.store.entries()
    if not old and not checkpoints:
        return
    listed = ", ".join([p.name for p in old] + ([f"{len(checkpoints)} checkpoint(s)"] if checkpoints else []))
    r.store.warn(f"resume=never: removing the previous run's {listed} from {r.out_dir}")
    trash = r.out_dir / f".discarded-{os.getpid()}-{int(time.time())}"
    trash.mkdir()
    for path in old + ([r.store.folder] if checkpoints else []):
        os.replace(path, trash / path.name)  # same file system: each move is one rename
    shutil.rmtree(trash, ignore_errors=True)


def _restore_loader(r: Run, state: dict[str, Any]) -> None:
    """Mid-epoch: the loader continues at the saved batch; at an epoch boundary the next epoch starts fresh."""
    progress = state["progress"]
    if progress["epoch_step"] > 0 and progress["epoch"] < r.cfg.optim.epochs:
        r.loaders.train.load_state_dict(state["loader"][r.info.rank])


# ----------------------------------------------------------------------------------------------- the loop


def _train_epoch(r: Run, prog: Progress, guard: PreemptionGuard) -> None:
    """One epoch (or the rest of one): step, backward, optimizer step at the accumulation boundary, check at the
    check points (:func:`_check_due`), log, checkpoint. No host sync between check points."""
    cfg, info, backend = r.cfg, r.info, r.backend
    if prog.epoch_step == 0:
        # A logit store read with store_epochs=cycle replays its stored epochs: the loader draws that epoch's views.
        data_epoch = getattr(r.teachers, "data_epoch", None)
        r.loaders.train.set_epoch(data_epoch(prog.epoch) if data_epoch else prog.epoch)
    backend.train()
    # Config values read once per epoch, not per step (an OmegaConf lookup costs microseconds).
    global_batch, accum, ensemble = int(cfg.data.batch_size), r.accum, str(cfg.metrics.ensemble)
    log_every = r.log_every if info.is_main else 0
    meter, t0 = Throughput(), time.perf_counter()
    micro_in_epoch = prog.epoch_step * accum  # micro-batches of this epoch already behind us
    batches = progress(_rng_isolated(r.loaders.train), f"epoch {prog.epoch}", len(r.loaders.train) - micro_in_epoch,
                       info.is_main)
    stop: int | None = None
    try:
        for batch in batches:
            if prog.epoch_step == r.steps_per_epoch:
                continue  # the remainder of micro-batches that does not fill a step (read, not trained on)
            boundary = (micro_in_epoch + 1) % accum == 0
            r.session_micro += 1
            if r.hooks:
                context = StepContext(prog.epoch, prog.step, r.session_micro)
                for hook in r.hooks:
                    hook(context)
            with backend.no_sync(boundary):
                out = r.step(batch, prog.epoch, prog.epoch_step)
                if out.flags is not None:
                    r.watch.add(out.flags, prog.epoch, prog.step + 1)
                if r.session_micro == 1:
                    # The session's first micro-step ran the loss's host-side input checks: act on them before any
                    # backward (a broken teacher, a wrong class count fail here with their own message).
                    stop = _check(r, prog, guard, out.problem) or stop
                backend.backward(out.loss, boundary)
            prog.add_terms(out.terms)
            prog.add_counts(train_counts(out, ensemble))
            micro_in_epoch += 1
            if not boundary:
                continue
            if _check_due(r, prog):
                stop = _check(r, prog, guard) or stop  # before the optimizer step: its gradients are finite
            elif info.world_size == 1 and guard.requested:
                stop = guard.requested  # one process: the signal needs no agreement, so no check point
            lr = backend.lr()  # the rate this step uses (the scheduler moves on in step())
            skipped = backend.step()
            if skipped is not None:  # the finite-step gate's device flag, read at the next check point
                r.watch.add_step(skipped, prog.epoch, prog.step + 1)
            prog.step += 1
            prog.epoch_step += 1
            prog.images += global_batch
            meter.add(global_batch)
            if log_every and prog.step % log_every == 0:  # a check point: the device has caught up
                _log_step(r, prog, out.terms, lr, meter.rate())
                if hasattr(batches, "set_postfix"):  # the terminal's progress bar
                    batches.set_postfix(loss=f"{float(out.loss):.4f}", lr=f"{lr:.3g}", refresh=False)
            if stop is not None:
                _save(r, prog)
                r.logger.log({"event": "preempted", "signal": signal.Signals(stop).name, "epoch": prog.epoch,
                              "step": prog.step})
                raise hand_over(guard, stop, info.rank, cfg.train.requeue,
                                f"epoch {prog.epoch}, step {prog.step} ({r.store.folder})")
            if _checkpoint_due(r, prog):
                _save(r, prog)
    finally:
        prog.train_s += time.perf_counter() - t0


def _check_due(r: Run, prog: Progress) -> bool:
    """Whether the optimizer step about to be taken (``prog.step + 1``) is a check point: every
    :data:`CHECK_EVERY` steps, a step that is logged or checkpointed, and the epoch's last step. The same answer on
    every rank (it depends on the step and the config only), so the check's collective always pairs up."""
    step = prog.step + 1
    return (step % CHECK_EVERY == 0 or prog.epoch_step + 1 == r.steps_per_epoch
            or bool(r.log_every and step % r.log_every == 0) or bool(r.checkpoint_every and step % r.checkpoint_every == 0))


def _checkpoint_due(r: Run, prog: Progress) -> bool:
    return bool(r.checkpoint_every) and prog.step % r.checkpoint_every == 0 and prog.epoch_step < r.steps_per_epoch


def _check(r: Run, prog: Progress, guard: PreemptionGuard | None = None, problem: str = "") -> int | None:
    """The all-rank check point: this rank's deferred flags in one device-to-host transfer, then one tiny CPU
    all-reduce of (non-finite anywhere?, the first such step and its kind, the preemption signal). A non-finite loss
    or a step skipped for non-finite gradients on any rank stops every rank, naming the first step where it appeared
    (:class:`TrainingDiverged`); at the same step a loss outranks gradients (a NaN loss on one rank makes every
    rank's averaged gradients NaN). A signal to any rank makes every rank hand over the same one (the highest
    number). ``problem``: a host-side finding of this micro-step (the loss's input checks)."""
    bad = Finding(prog.epoch, prog.step + 1, problem) if problem else r.watch.first_bad()
    # max over ranks of -2 step + (1 if a loss): the earliest step, and at that step a loss before gradients
    none = -(2**62)
    key = -2 * bad.step + int(bad.loss) if bad is not None else none
    any_bad, first, stop = dist.max_across_ranks([int(bad is not None), key, (guard.requested or 0) if guard else 0])
    if any_bad:
        loss, step = first % 2 == 1, (first % 2 - first) // 2
        if bad is not None and key == first:
            epoch, detail = bad.epoch, bad.detail
        else:
            epoch = prog.epoch
            detail = "a non-finite loss on another rank" if loss else "non-finite gradients on another rank"
        raise TrainingDiverged(f"training diverged at epoch {epoch}, step {step}: {detail}; {_last_good(r)}")
    return stop or None


def _check_state(r: Run, prog: Progress) -> None:
    """Every rank checks the model's parameters and buffers (BatchNorm statistics can overflow while the loss is
    still finite); a non-finite entry anywhere means the run diverged, and nothing is saved."""
    bad = nonfinite_entries(r.backend.module.state_dict())
    if dist.max_across_ranks([int(bool(bad)), 0])[0]:
        what = f"the model's {bad[0]} holds NaN/Inf" if bad else "the model state of another rank holds NaN/Inf"
        raise TrainingDiverged(f"training diverged at epoch {prog.epoch}, step {prog.step}: {what} although the loss "
                               f"was finite; {_last_good(r)}")


def _last_good(r: Run) -> str:
    """Where the run can restart from, for the divergence message (true: nothing is written after a divergence)."""
    entries = r.store.entries()
    if not entries:
        return "no checkpoint was written; rerun with a lower optim.lr (or optim.clip_grad_norm)"
    return (f"nothing was saved after the last good checkpoint {entries[-1].path}, which is kept; restart from it "
            f"with a lower rate: optim.lr=<lower> resume_changes=[optim.lr] (or use optim.clip_grad_norm)")


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
    """Check the state, evaluate, record the epoch, checkpoint."""
    _check(r, prog)  # nothing left unread (the epoch's last step was a check point); cheap insurance
    _sync_buffers(r.backend.module)
    _check_state(r, prog)
    with EvalForward(r.backend.module, r.policy) as model:
        r.reliability = {}
        metrics = evaluate(model, r.loaders.val, r.teachers, r.loaders.num_classes, r.cfg.metrics,
                           half_split=r.cfg.batch_ops.half_split, mean=r.cfg.data.mean, std=r.cfg.data.std,
                           reliability=r.reliability)
    train = train_metrics(prog.train_counts, metrics.get("accuracy"))
    record = {"epoch": prog.epoch, **prog.close_epoch(), **train, **{f"val_{k}": v for k, v in metrics.items()}}
    prog.history.append(record)
    prog.metrics = {**metrics, **train}
    prog.epoch += 1
    r.logger.log({"event": "epoch", **record, "train_s": round(prog.train_s, 3), **memory_stats(r.info.device)})
    r.scalars.add("epoch", record, prog.epoch)
    _save(r, prog)


def _sync_buffers(module: nn.Module) -> None:
    """Rank 0's BatchNorm statistics everywhere (what DDP broadcasts at each forward, and what is saved), so
    evaluation on every shard uses the same model."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or dist.info().world_size == 1:
        return
    for buf in module.buffers():
        torch.distributed.broadcast(buf, src=0)


# ----------------------------------------------------------------------------------------------- saving


def _save(r: Run, prog: Progress) -> Path:
    """A full checkpoint (collective: every rank's RNG and loader state are gathered), then keep-last-N. A state
    that is not finite is never written (:func:`_check`: the deferred loss flags; :func:`_check_state`)."""
    _check(r, prog)
    _sync_buffers(r.backend.module)
    _check_state(r, prog)
    prog.wall_s = r.wall_s()
    state = {
        **_model_meta(r, prog),
        "format": FORMAT, "backend": r.backend.name, "world_size": r.info.world_size, "trial": r.cfg.name,
        "progress": prog.state_dict(),
        "rng": dist.all_gather_object(rng.capture()),
        "loader": dist.all_gather_object(r.loaders.train.state_dict()),
        # Each rank's own partial training counts of the epoch (summed over ranks only at the epoch's end).
        "train_counts": dist.all_gather_object({k: int(v) for k, v in prog.train_counts.items()}),
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
    # One device-to-host transfer for all terms (a float() per term would sync once per term).
    numbers = torch.stack([v.detach().float().reshape(()) for v in terms.values()]).tolist()
    values = dict(zip(terms, numbers))
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
    if r.reliability:  # the last evaluation's bins, for the report's reliability diagrams
        results["reliability"] = r.reliability
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
