"""Writing (and verifying) a logit store: ``hpckd teachers cache CONFIG``.

The writer replays the training pipeline of the config one *global* micro-batch at a time: the training loader
with world size 1 and the global micro-batch ``data.batch_size / optim.accum_steps`` (the order of an epoch and
every view are world-size invariant, :mod:`hpckd.data.sharding`, :mod:`hpckd.data.params`), the batch ops with
:class:`~hpckd.data.batchops.KeyedDraws` as rank 0 of 1 (the same mixes any world size dividing
``batch_ops.mix_groups`` draws), then every teacher on the view it reads. Each (epoch, sample id, variant) row's
logits go to the shard of its unit (``--shard-steps`` consecutive micro-batches of one epoch).

What is stored is what the training step asks for: the rows of every teacher call it makes. With CutMixPick (no
half split) that is the pool (variants ``POOL_VARIANT + j``) and the original rows of a doubled batch (variant
0): the step reuses the pool's logits for the kept rows (:func:`~hpckd.data.batchops.teacher_logits_after_ops`),
so their variants ``1 + j`` are stored only with a half split. Stores written before that also hold the kept
rows: a superset, which serves the step as well, is accepted by a rerun of the writer and is verified (the
verifier replays the kept rows too).

Parallel: the units are dealt round-robin to the workers, worker = part * W + rank of W ranks (gloo/NCCL
processes of one job, launched by torchrun/srun/mpirun) in part ``i`` of ``n`` (``--part i/n``, array tasks). A
finished shard (present and passing its checksum) is skipped, so a killed writer reruns where it stopped; shards are
written atomically, so a half-written one is never visible. The worker that finds every shard present writes
``index.json``; a store without it is refused as incomplete.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hpckd import dist
from hpckd.config import BatchOpsConfig
from hpckd.config.schema import ServingConfig
from hpckd.data.batch import Batch
from hpckd.data.batchops import KeyedDraws, apply_batch_ops, teacher_logits_after_ops, validated
from hpckd.data.cutmixpick import n_keep, needs_student
from hpckd.data.datasets import load_splits
from hpckd.data.loaders import image_format, loader_class, view_policies
from hpckd.data.sharding import ShardSpec, steps_per_epoch
from hpckd.io import atomic_write_json, remove_stale_temp_files
from hpckd.precision import PrecisionPolicy
from hpckd.teachers.ensemble import ensemble_distribution
from hpckd.teachers.serving import TeacherSet
from hpckd.teachers.store import (
    LogitStore,
    StoreError,
    Unit,
    decode,
    encode,
    file_sha256,
    human,
    key_difference,
    key_hash,
    read_json,
    round_trip,
    shard_ok,
    shard_path,
    size_report,
    store_key,
    units,
    write_index,
    write_shard,
)

Log = Callable[[str], None]


@dataclass
class Plan:
    """What a store of this config holds and where."""

    key: dict[str, Any]
    folder: Path
    epochs: int
    topk: int
    micro_batch: int
    steps_per_epoch: int
    shard_steps: int
    rows_per_step: int
    num_classes: int
    num_teachers: int
    train_index: Any

    @property
    def manifest(self) -> dict[str, Any]:
        per_epoch, total = self.sizes
        return {"format": self.key["format"], "key": self.key, "key_hash": key_hash(self.key),
                "layout": {"epochs": self.epochs, "micro_batch": self.micro_batch,
                           "steps_per_epoch": self.steps_per_epoch, "shard_steps": self.shard_steps,
                           "rows_per_epoch": self.rows_per_epoch, "bytes_per_epoch": per_epoch,
                           "bytes_total": total}}

    @property
    def rows_per_epoch(self) -> int:
        return self.rows_per_step * self.steps_per_epoch

    @property
    def sizes(self) -> tuple[int, int]:
        return size_report(self.rows_per_epoch, self.num_classes, self.topk, self.num_teachers, self.epochs)

    @property
    def units(self) -> list[Unit]:
        return units(self.epochs, self.steps_per_epoch, self.shard_steps)


def rows_per_micro_batch(bo: BatchOpsConfig, micro: int, kept_rows: bool | None = None) -> int:
    """Stored rows one global micro-batch gives (every variant of every sample the step asks for).

    CutMixPick stores its pool and, for a doubled batch, the original rows; its kept rows only when
    ``kept_rows`` (default: with a half split, where the step looks them up; stores written before the step
    reused the pool's logits hold them in every case)."""
    if bo.scheme == "none":
        return micro
    if bo.scheme != "cutmix_pick":
        return 2 * micro if bo.doubled else micro
    runs = int(bo.pick_pool)
    groups = [len(range(g, micro, bo.mix_groups)) for g in range(min(bo.mix_groups, micro))]
    kept = sum(n_keep(runs * m, bo.pick_ratio) for m in groups)
    if kept_rows is None:
        kept_rows = bo.half_split != "none"
    return (micro if bo.doubled else 0) + runs * micro + (kept if kept_rows else 0)


def check_cacheable(bo: BatchOpsConfig) -> None:
    if needs_student(bo):
        raise StoreError(f"batch_ops.pick_criterion={bo.pick_criterion} scores the CutMixPick pool with the student, "
                         f"which a logit store cannot hold; use pick_criterion=teacher_entropy or serving.mode=inline")


def make_plan(cfg: Any, epochs: int, topk: int, out: str | None, shard_steps: int, device_type: str) -> Plan:
    bo = validated(_batch_ops(cfg))
    check_cacheable(bo)
    if not cfg.teachers:
        raise StoreError("the config has no teachers: a logit store holds teacher outputs")
    if epochs < 1:
        raise StoreError(f"--epochs is {epochs}; store at least 1 epoch")
    train_index, _ = load_splits(cfg.data)
    num_classes = int(train_index.num_classes)
    if topk >= num_classes:
        raise StoreError(f"--topk {topk} keeps every one of the {num_classes} classes; use --topk 0 (full fp16 "
                         f"logits) or a smaller k")
    hashes = [file_sha256(t.checkpoint) for t in cfg.teachers]
    key = store_key(cfg, hashes, train_index.fingerprint(), num_classes, topk, device_type)
    micro = key["micro_batch"]
    steps = steps_per_epoch(len(train_index.labels), ShardSpec(0, 1), micro, True)
    if shard_steps <= 0:
        shard_steps = max(1, -(-4096 // micro))  # ~4096 rows a shard
    folder = Path(out) if out else Path("stores") / key_hash(key)[:16]
    return Plan(key, folder, int(epochs), int(topk), micro, steps, min(shard_steps, steps),
                rows_per_micro_batch(bo, micro), num_classes, len(cfg.teachers), train_index)


def _batch_ops(cfg: Any) -> BatchOpsConfig:
    node = cfg.batch_ops
    return node if isinstance(node, BatchOpsConfig) else BatchOpsConfig(**{k: node[k] for k in node})


def _check_manifest(plan: Plan) -> None:
    """A folder that already holds a store must hold this one (same key and layout)."""
    path = plan.folder / "manifest.json"
    if not path.exists():
        return
    found = read_json(path, "manifest")
    diff = key_difference(plan.key, found.get("key", {}))
    if diff is None:
        want, have = plan.manifest["layout"], found.get("layout", {})
        if have != want and have == _legacy_layout(plan):
            return  # written before the step reused CutMixPick's pool logits: it holds a superset of the rows
        diff = next((f"layout.{k}: this command has {want[k]}, the store has {have.get(k)}"
                     for k in want if want[k] != have.get(k)), None)
    if diff is not None:
        raise StoreError(f"{plan.folder} holds a logit store written for something else ({diff}); use another "
                         f"--out or the arguments it was written with")


def _legacy_layout(plan: Plan) -> dict[str, Any]:
    """The layout a store of this plan had when CutMixPick's kept rows were stored in every case."""
    rows = rows_per_micro_batch(_batch_ops_of_key(plan.key), plan.micro_batch, kept_rows=True)
    return dataclasses.replace(plan, rows_per_step=rows).manifest["layout"]


def _batch_ops_of_key(key: dict[str, Any]) -> BatchOpsConfig:
    fields = {f.name for f in dataclasses.fields(BatchOpsConfig)}
    return BatchOpsConfig(**{k: v for k, v in key["batch_ops"].items() if k in fields})


def _check_disk(plan: Plan, todo: int) -> None:
    per_unit = plan.sizes[0] / max(1, plan.steps_per_epoch) * plan.shard_steps
    need = int(per_unit * todo)
    probe = plan.folder if plan.folder.exists() else next(p for p in plan.folder.parents if p.exists())
    free = shutil.disk_usage(probe).free
    if need > free:
        raise StoreError(f"the logit store needs {human(need)} more but {probe} has {human(free)} free; free some "
                         f"space, use --topk, fewer --epochs or another --out")


# ----------------------------------------------------------------------------------------------- the pipeline


class Replayer:
    """The training pipeline of one global micro-batch: loader -> batch ops -> teachers, with every row recorded."""

    def __init__(self, cfg: Any, plan: Plan, device: torch.device) -> None:
        self.cfg, self.plan, self.device = cfg, plan, device
        data = cfg.data
        self.loader = loader_class(data.loader)(
            plan.train_index.source, plan.train_index.labels, view_policies(cfg, [t.aug for t in cfg.teachers]),
            batch_size=plan.micro_batch, train=True, shard=ShardSpec(0, 1), seed=int(cfg.seed),
            num_threads=int(data.num_workers), device=device, mean=data.mean, std=data.std,
            image_format=image_format(cfg))
        serving = ServingConfig(**{k: cfg.serving[k] for k in ("amp", "channels_last", "compile", "compile_backend")})
        self.teachers = TeacherSet.from_checkpoints([t.checkpoint for t in cfg.teachers], device, serving,
                                                    precision=PrecisionPolicy.from_config(cfg, device))
        self.batch_ops = validated(_batch_ops(cfg))

    def micro_batches(self, unit: Unit):
        """(micro-step, batch) of the unit's global micro-batches."""
        self.loader.set_epoch(unit.epoch)
        self.loader.load_state_dict({"epoch": unit.epoch, "step": unit.start})
        for i, batch in enumerate(self.loader):
            yield unit.start + i, batch
            if i + 1 == unit.count:
                break

    def rows(self, batch: Batch, every_row: bool = False) -> list[tuple[np.ndarray, np.ndarray, list[torch.Tensor]]]:
        """(ids, variants, logits per teacher) of every teacher call the training step makes on this batch: as
        the step, :func:`~hpckd.data.batchops.teacher_logits_after_ops` (CutMixPick's kept rows reuse the
        pool's logits, no call of their own). ``every_row`` adds a call on the whole output batch (the kept rows'
        variants ``1 + j`` too, which stores written before that reuse hold: the verifier's replay)."""
        calls: list[tuple[np.ndarray, np.ndarray, list[torch.Tensor]]] = []

        def run(b: Batch) -> list[torch.Tensor]:
            logits = self.teachers(b)
            calls.append((b.ids(), b.variants(), logits))
            return logits

        def scorer(pool: Batch):
            # Score with what a reader will get back, so the reader keeps exactly the rows stored here; each
            # teacher's pool logits go on with the kept rows, as in the step.
            logits = run(pool)
            return ensemble_distribution([round_trip(t, self.plan.topk) for t in logits]), None, logits

        bo = self.batch_ops
        if bo.scheme != "none" or bo.half_split != "none":
            draws = KeyedDraws(int(self.cfg.seed), int(batch.epoch), 0, 1, int(bo.mix_groups))
            batch = apply_batch_ops(batch, bo, draws, family=self.cfg.data.family, mean=list(self.cfg.data.mean),
                                    std=list(self.cfg.data.std), scorer=scorer)
        teacher_logits_after_ops(batch, run)
        if every_row and batch.known_logits is not None:
            run(batch)  # off the hot path: the output's ids and variants are read back from the device
        return calls

    def unit_arrays(self, unit: Unit) -> dict[str, np.ndarray]:
        ids, variants, steps = [], [], []
        per_teacher: list[list[torch.Tensor]] = [[] for _ in range(self.plan.num_teachers)]
        for step, batch in self.micro_batches(unit):
            for call_ids, call_variants, logits in self.rows(batch):
                ids.append(call_ids)
                variants.append(call_variants)
                steps.append(np.full(len(call_ids), step, np.int32))
                for k, t in enumerate(logits):
                    per_teacher[k].append(t.detach().float().cpu())
        all_ids, all_variants = np.concatenate(ids), np.concatenate(variants)
        # A row met twice (e.g. the same image scored and trained on) is stored once, first occurrence.
        _, first = np.unique(all_ids * 256 + all_variants, return_index=True)
        keep = np.sort(first)
        arrays: dict[str, np.ndarray] = {"ids": all_ids[keep], "variant": all_variants[keep].astype(np.int16),
                                         "step": np.concatenate(steps)[keep]}
        for k, parts in enumerate(per_teacher):
            for name, value in encode(torch.cat(parts)[torch.as_tensor(keep)], self.plan.topk).items():
                arrays[f"{name}{k}"] = value
        return arrays


# ----------------------------------------------------------------------------------------------- entry points


def cache(cfg: Any, *, epochs: int, topk: int = 0, out: str | None = None, part: tuple[int, int] = (0, 1),
          shard_steps: int = 0, verify: int = 0, log: Log = print) -> Path:
    """Write the store of ``cfg`` (the units of this worker), finish it when complete, optionally verify it."""
    info = dist.init(cfg.dist.device)
    plan = make_plan(cfg, epochs, topk, out, shard_steps, info.device.type)
    index, count = part
    worker, workers = index * info.world_size + info.rank, count * info.world_size
    all_units = plan.units
    mine = [u for i, u in enumerate(all_units) if i % workers == worker]
    if info.is_main and index == 0:
        per_epoch, total = plan.sizes
        form = f"top-{plan.topk} (fp16 values, indices, remaining mass)" if plan.topk else "fp16 full logits"
        log(f"hpckd: logit store {plan.folder}: {plan.rows_per_epoch} rows/epoch x {plan.num_teachers} teacher(s), "
            f"{form}: {human(per_epoch)} per epoch, {human(total)} for {plan.epochs} epoch(s)")
    _check_manifest(plan)
    todo = [u for u in mine if not shard_ok(shard_path(plan.folder, u))]
    _check_disk(plan, len(todo))
    if not (plan.folder / "manifest.json").exists():
        atomic_write_json(plan.folder / "manifest.json", plan.manifest)
    if todo:
        replayer = Replayer(cfg, plan, info.device)
        for unit in todo:
            write_shard(shard_path(plan.folder, unit), replayer.unit_arrays(unit))
            log(f"hpckd: wrote shard {unit.name} (worker {worker} of {workers})")
    if info.distributed:
        dist.barrier()
    complete = finish(plan)
    if complete and verify and info.is_main and index == 0:
        verify_store(cfg, plan.folder, verify, log=log)
    elif verify and not complete and info.is_main:
        log(f"hpckd: logit store {plan.folder} is not complete yet (other parts still writing): not verified")
    return plan.folder


def finish(plan: Plan) -> bool:
    """Write ``index.json`` when every shard is there; returns whether the store is complete."""
    digests = {}
    for unit in plan.units:
        path = shard_path(plan.folder, unit)
        if not path.exists():
            return False
        head = path.open("rb").read(len(b"HPCKDLS1") + 64)
        digests[unit.name] = head[8:].decode("ascii")
    if not (plan.folder / "index.json").exists():
        write_index(plan.folder, plan.manifest, digests)
        remove_stale_temp_files(plan.folder / "shards")
    return True


def verify_store(cfg: Any, folder: str | Path, n: int, *, seed: int = 0, log: Log = print) -> float:
    """Re-run the teachers on ``n`` random stored entries, replaying their views (and mixes), and compare with
    the stored logits (fp16 tolerance); returns the largest difference relative to the tolerance."""
    store = LogitStore(folder)
    device = dist.info().device
    layout = store.manifest["layout"]
    plan = make_plan(cfg, int(layout["epochs"]), int(store.key["topk"]), str(folder), int(layout["shard_steps"]),
                     device.type)
    store.check_key(plan.key)
    rng = np.random.default_rng(seed)
    shards = store.index["shards"]
    picks: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for _ in range(n):
        entry = shards[int(rng.integers(len(shards)))]
        store.load_epoch(int(entry["epoch"]))
        data = _shard_rows(store, entry)
        i = int(rng.integers(len(data["ids"])))
        picks.setdefault((int(entry["epoch"]), int(data["step"][i])), []).append((int(data["ids"][i]),
                                                                                  int(data["variant"][i])))
    replayer = Replayer(cfg, plan, device)
    worst = 0.0
    for (epoch, step), entries in sorted(picks.items()):
        (_, batch), = replayer.micro_batches(Unit(epoch, step, 1))
        fresh: dict[tuple[int, int], list[torch.Tensor]] = {}
        for ids, variants, logits in replayer.rows(batch, every_row=True):
            for r, key in enumerate(zip(ids.tolist(), variants.tolist())):
                fresh.setdefault(key, [t[r].float().cpu() for t in logits])
        ids = np.array([e[0] for e in entries])
        variants = np.array([e[1] for e in entries])
        stored = store.logits(epoch, ids, variants)
        for j, key in enumerate(entries):
            if key not in fresh:
                raise StoreError(f"logit store {folder}: epoch {epoch}, sample {key[0]}, variant {key[1]} is not "
                                 f"made by the replayed micro-step {step}: the store does not match this config")
            for k, mine in enumerate(fresh[key]):
                want = round_trip(mine[None], store.key["topk"])[0] if store.key["topk"] else mine
                tol = 2.0 ** -10 * want.abs().max().clamp(min=1.0) + 1e-4
                err = float((stored[k][j] - want).abs().max())
                worst = max(worst, err / float(tol))
                if err > tol:
                    raise StoreError(f"logit store {folder}: teacher {k} at epoch {epoch}, sample {key[0]}, variant "
                                     f"{key[1]} differs from the recomputed logits by {err:.3g} (> {float(tol):.3g})")
    log(f"hpckd: verified {n} stored entries of {folder}: recomputed == stored within fp16 tolerance "
        f"(worst {worst:.2f} of the tolerance)")
    return worst


def _shard_rows(store: LogitStore, entry: dict[str, Any]) -> dict[str, np.ndarray]:
    from hpckd.teachers.store import read_shard

    return read_shard(store.folder / "shards" / entry["file"], entry["sha256"])


def parse_part(text: str) -> tuple[int, int]:
    """``i/n`` -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise StoreError(f"--part {text!r} is not i/n (e.g. 0/4 for the first of 4 array tasks)") from None
    if not 0 <= i < n:
        raise StoreError(f"--part {text!r}: need 0 <= i < n")
    return i, n


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


__all__ = ["Plan", "cache", "decode", "finish", "make_plan", "parse_part", "rows_per_micro_batch", "verify_store"]
