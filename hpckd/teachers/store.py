"""The logit store: teacher outputs computed once for E epochs of a training config, read back by (epoch, sample id).

Why it is exact: every view is a pure function of (seed, epoch, view policy, sample id) (:mod:`hpckd.data.params`)
and the batch ops' mixes are a function of sample ids and global positions (:class:`hpckd.data.batchops.KeyedDraws`),
so the writer (:mod:`hpckd.teachers.store_writer`) reproduces the very images a training run will show its teachers,
and the run looks each row up instead of running the teachers.

A row is keyed by ``(epoch, sample id, variant)``; the variant (``batch.aug["variant"]``) names which image of the
sample the row is: 0 = the loader's view, 1 + j = made by run j of the batch op (Mixup, CutMix, a follow-up scheme;
CutMixPick's pool rows are ``POOL_VARIANT + j``, scored before the half split, and its kept rows 1 + j). Each
teacher reads its own view of that image (``teacher{k}`` policies, half split), so its row holds its own logits.
CutMixPick's kept rows are read only with a half split: without one the training step reuses their pool rows'
logits (the same images), so a store holds them only then; stores written before that hold them in every case,
which is a superset and serves as well.

Layout of a store folder::

    manifest.json   the key (what determines the content: teacher checkpoint hashes, data fingerprint, view
                    policies, batch ops, seed, loader, image format, micro-batch, k, format version) + the layout
    shards/e{epoch}-m{first micro-step}.shard   one unit of work: ``count`` consecutive global micro-batches
    index.json      written once every shard exists: file, epoch, rows, sha256 of each shard

A shard file is ``MAGIC``, the sha256 of the payload (64 hex characters), a newline, then the payload (a numpy
``.npz``: ``ids`` int64, ``variant`` int16, ``step`` int32 (micro-step in the epoch), and per teacher k either
``logits{k}`` (R, C) float16, or ``values{k}`` (R, k) float16 top-k logits, ``indices{k}`` (R, k) uint16/int32
and ``rest{k}`` (R,) float32, the softmax mass outside the top k). Written with :func:`hpckd.io.atomic_open`, so a
shard is whole or absent.

Top-k targets (how every KD loss consumes them): the reader turns a top-k row back into a full logit vector whose
softmax is the teacher's distribution with the top k probabilities kept exactly and the remaining mass m spread
evenly over the C - k other classes: ``z_j = log(m / (C - k)) + lse`` with ``lse = logsumexp(values) - log(1 - m)``
(so ``softmax(z)_i = p_i`` on the top k). Losses then apply their temperature to these logits as to real ones; no
loss needs to know. The error: at temperature tau, with p the teacher's tempered distribution, q the
reconstructed one, s the student's and t_p, t_q the tempered masses outside the top k, ``||p - q||_1 <= 2 (t_p +
t_q)``; the cross-entropy KD term moves by ``tau^2 |sum_j (q_j - p_j) log s_j| <= tau^2 / 2 ||p - q||_1 (max_j
log s_j - min_j log s_j)`` (the differences sum to zero, so half the range of log s is what multiplies them), and
the KL form adds the entropy change, ``|H(q) - H(p)| <= 1/2 ||p - q||_1 (max_j log max(p_j, q_j) - min_j log
min(p_j, q_j))`` (mean value theorem). Tail mass grows with tau (tempering flattens), so a small k costs most at
KD temperatures (tau = 4): tests/test_store_topk.py measures it on real teacher outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from hpckd.data.batchops import POOL_VARIANT
from hpckd.errors import UserError
from hpckd.io import atomic_open, atomic_write_json
from hpckd.teachers.source import AttentionSource

FORMAT_VERSION = 1
MAGIC = b"HPCKDLS1"
MIN_REST = 1e-30  # floor of the stored remaining mass (log of 0 would make the losses NaN)
ROW_BYTES = 8 + 2 + 4  # ids int64 + variant int16 + step int32


class StoreError(UserError):
    """A store that cannot serve this run: missing, incomplete, corrupt, or written for something else."""


# ----------------------------------------------------------------------------------------------- encoding


def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint16) if num_classes <= 65535 else np.dtype(np.int32)


def bytes_per_row(num_classes: int, topk: int) -> int:
    """Bytes one teacher's row takes: fp16 logits, or top-k fp16 values + indices + fp32 remaining mass."""
    if topk <= 0:
        return 2 * num_classes
    return topk * (2 + index_dtype(num_classes).itemsize) + 4


def encode(logits: torch.Tensor, topk: int) -> dict[str, np.ndarray]:
    """fp32 (R, C) logits -> the arrays stored for one teacher (see the module docstring)."""
    x = logits.detach().float().cpu()
    if topk <= 0:
        return {"logits": x.numpy().astype(np.float16)}
    values, indices = torch.topk(x, topk, dim=1)
    mass = torch.softmax(x.double(), dim=1).gather(1, indices).sum(1)
    rest = (1.0 - mass).clamp(min=MIN_REST).float()
    return {"values": values.numpy().astype(np.float16), "indices": indices.numpy().astype(index_dtype(x.shape[1])),
            "rest": rest.numpy()}


def decode(arrays: dict[str, np.ndarray], num_classes: int) -> torch.Tensor:
    """The stored arrays of one teacher -> fp32 (R, C) logits (top-k: the reconstruction of the module docstring)."""
    if "logits" in arrays:
        return torch.from_numpy(np.asarray(arrays["logits"], dtype=np.float32))
    values = torch.from_numpy(np.asarray(arrays["values"], dtype=np.float64))
    indices = torch.from_numpy(np.asarray(arrays["indices"]).astype(np.int64))
    rest = torch.from_numpy(np.asarray(arrays["rest"], dtype=np.float64)).clamp(MIN_REST, 1.0 - 1e-12)
    k = values.shape[1]
    lse = torch.logsumexp(values, dim=1) - torch.log1p(-rest)
    if num_classes > k:
        other = torch.log(rest / (num_classes - k)) + lse
    else:
        other = torch.full_like(lse, -1e4)
    out = other[:, None].expand(values.shape[0], num_classes).clone()
    out.scatter_(1, indices, values)
    return out.float()


def round_trip(logits: torch.Tensor, topk: int) -> torch.Tensor:
    """What a reader will get back for ``logits``: the writer scores CutMixPick pools with these, so the reader
    (which only has the stored values) keeps the same rows."""
    return decode(encode(logits, topk), logits.shape[1]).to(logits.device)


def write_shard(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """Write one shard atomically; returns the payload's sha256."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    with atomic_open(path, "wb") as handle:
        handle.write(MAGIC + digest.encode() + b"\n")
        handle.write(payload)
    return digest


def read_shard(path: Path, expected: str | None = None) -> dict[str, np.ndarray]:
    """A shard's arrays; one-line :class:`StoreError` when it is missing or fails its checksum."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"logit store shard {path} is missing; rerun `hpckd teachers cache` with the same "
                         f"arguments to write it again") from None
    head = len(MAGIC) + 65
    digest = hashlib.sha256(raw[head:]).hexdigest()
    recorded = raw[len(MAGIC):head - 1].decode("ascii", "replace")
    if not raw.startswith(MAGIC) or digest != recorded or (expected is not None and digest != expected):
        raise StoreError(f"logit store shard {path} is corrupt (checksum mismatch); delete it and rerun "
                         f"`hpckd teachers cache` to write it again")
    with np.load(io.BytesIO(raw[head:])) as data:
        return {k: data[k] for k in data.files}


def shard_ok(path: Path) -> bool:
    """Whether a finished shard is there and passes its checksum (the writer skips those)."""
    try:
        read_shard(path)
    except StoreError:
        return False
    return True


# ----------------------------------------------------------------------------------------------- the key


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """JSON-comparable form of config values and policies (tuples as lists, dataclasses as dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def store_key(cfg: Any, teacher_hashes: Sequence[str], fingerprint: str, num_classes: int, topk: int,
              device_type: str) -> dict[str, Any]:
    """What determines a store's content, field by field (the order is the order differences are reported in).

    Two trials of a sweep whose keys are equal read the same store (its default folder is named by the key's
    hash)."""
    from hpckd.config import to_container
    from hpckd.data.loaders import view_policies

    data = cfg.data
    teacher_augs = [t.aug for t in cfg.teachers]
    micro = int(data.batch_size) // int(cfg.optim.accum_steps)
    # On CUDA teachers run under bf16 autocast when serving.amp; on CPU in the training precision.
    if device_type == "cuda":
        teacher_precision = "bf16" if bool(cfg.serving.amp) else "fp32"
    else:
        teacher_precision = str(cfg.train.precision)
    return {
        "format": FORMAT_VERSION,
        "teachers": list(teacher_hashes),
        "data_fingerprint": fingerprint,
        "num_classes": int(num_classes),
        "view_policies": _plain(view_policies(cfg, teacher_augs)),
        "batch_ops": _plain(to_container(cfg.batch_ops)),
        "seed": int(cfg.seed),
        "loader": str(data.loader),
        "image": {"size": int(data.image_size), "mean": list(data.mean), "std": list(data.std),
                  "dtype": str(data.dtype)},
        "micro_batch": micro,
        "teacher_precision": teacher_precision,
        "topk": int(topk),
    }


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def key_difference(expected: dict[str, Any], found: dict[str, Any]) -> str | None:
    """The first field where two keys differ, as 'field: run has X, store has Y' (None when equal)."""
    for name in list(expected) + [k for k in found if k not in expected]:
        a, b = expected.get(name), found.get(name)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                inner = key_difference(a, b)
                return f"{name}.{inner}" if inner else name
            if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
                i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                return f"{name}[{i}]: the run has {_short(a[i])}, the store has {_short(b[i])}"
            return f"{name}: the run has {_short(a)}, the store has {_short(b)}"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Unit:
    """``count`` consecutive global micro-batches of one epoch, starting at micro-step ``start``: one shard."""

    epoch: int
    start: int
    count: int

    @property
    def name(self) -> str:
        return f"e{self.epoch:05d}-m{self.start:07d}.shard"


def units(epochs: int, steps_per_epoch: int, shard_steps: int) -> list[Unit]:
    return [Unit(e, s, min(shard_steps, steps_per_epoch - s))
            for e in range(epochs) for s in range(0, steps_per_epoch, shard_steps)]


def shard_path(folder: Path, unit: Unit) -> Path:
    return folder / "shards" / unit.name


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path.parent} is not a logit store ({path.name} is missing); write one with "
                         f"`hpckd teachers cache`") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"logit store {what} {path} is unreadable ({exc}); rerun `hpckd teachers cache`") from exc


def write_index(folder: Path, manifest: dict[str, Any], digests: dict[str, str]) -> None:
    layout = manifest["layout"]
    shards = [{"file": u.name, "epoch": u.epoch, "start": u.start, "count": u.count, "sha256": digests[u.name]}
              for u in units(layout["epochs"], layout["steps_per_epoch"], layout["shard_steps"])]
    atomic_write_json(folder / "index.json", {"format": FORMAT_VERSION, "key_hash": manifest["key_hash"],
                                              "shards": shards})


# ----------------------------------------------------------------------------------------------- reading


class LogitStore:
    """Read access to a finished store: one epoch's rows in memory at a time (all ranks read their rows)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise StoreError(f"logit store {self.folder} does not exist; write it with `hpckd teachers cache`")
        self.manifest = read_json(self.folder / "manifest.json", "manifest")
        if self.manifest.get("format") != FORMAT_VERSION:
            raise StoreError(f"logit store {self.folder} has format {self.manifest.get('format')}, this hpckd reads "
                             f"{FORMAT_VERSION}; write it again with `hpckd teachers cache`")
        if not (self.folder / "index.json").exists():
            layout = self.manifest["layout"]
            total = len(units(layout["epochs"], layout["steps_per_epoch"], layout["shard_steps"]))
            done = len(list((self.folder / "shards").glob("*.shard"))) if (self.folder / "shards").is_dir() else 0
            raise StoreError(f"logit store {self.folder} is incomplete ({done} of {total} shards written); rerun "
                             f"`hpckd teachers cache` with the same arguments to finish it")
        self.index = read_json(self.folder / "index.json", "index")
        self.key: dict[str, Any] = self.manifest["key"]
        self.epochs = int(self.manifest["layout"]["epochs"])
        self.num_classes = int(self.key["num_classes"])
        self.num_teachers = len(self.key["teachers"])
        self._epoch: int | None = None
        self._codes = np.zeros(0, np.int64)
        self._order = np.zeros(0, np.int64)
        self._teachers: list[dict[str, np.ndarray]] = []

    def check_key(self, expected: dict[str, Any]) -> None:
        """One line naming the first difference between this run's key and the store's."""
        diff = key_difference(expected, self.key)
        if diff is not None:
            raise StoreError(f"logit store {self.folder} was written for another run ({diff}); write a store for "
                             f"this config with `hpckd teachers cache`")

    def load_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        parts = [read_shard(self.folder / "shards" / s["file"], s["sha256"])
                 for s in self.index["shards"] if int(s["epoch"]) == epoch]
        ids = np.concatenate([p["ids"] for p in parts])
        variant = np.concatenate([p["variant"] for p in parts]).astype(np.int64)
        codes = ids * 256 + variant
        self._order = np.argsort(codes, kind="stable")
        self._codes = codes[self._order]
        self._teachers = []
        for k in range(self.num_teachers):
            names = [n for n in parts[0] if n.endswith(str(k)) and n[:-len(str(k))] in ("logits", "values",
                                                                                       "indices", "rest")]
            self._teachers.append({n[:-len(str(k))]: np.concatenate([p[n] for p in parts]) for n in names})
        self._epoch = epoch

    def rows(self, epoch: int, ids: np.ndarray, variants: np.ndarray) -> np.ndarray:
        """Row numbers (into the loaded epoch) of the entries ``(epoch, ids[i], variants[i])``."""
        self.load_epoch(epoch)
        codes = np.asarray(ids, np.int64) * 256 + np.asarray(variants, np.int64)
        at = np.searchsorted(self._codes, codes)
        found = (at < len(self._codes)) & (self._codes[np.minimum(at, len(self._codes) - 1)] == codes)
        if not found.all():
            i = int(np.flatnonzero(~found)[0])
            raise StoreError(f"logit store {self.folder} has no entry for epoch {epoch}, sample {int(ids[i])}, "
                             f"variant {int(variants[i])}: the run's batches differ from the stored ones (data "
                             f"order, batch size or batch ops); write a store for this config")
        return self._order[at]

    def logits(self, epoch: int, ids: np.ndarray, variants: np.ndarray) -> list[torch.Tensor]:
        """fp32 (N, C) logits of every teacher for the given entries."""
        rows = self.rows(epoch, ids, variants)
        return [decode({k: v[rows] for k, v in t.items()}, self.num_classes) for t in self._teachers]


def stored_epoch(epoch: int, epochs: int, policy: str, folder: Path) -> int:
    """The stored epoch whose views (order, augmentation, mixes) training epoch ``epoch`` replays
    (``serving.store_epochs``: cycle | error)."""
    if epoch < epochs:
        return epoch
    if policy == "cycle":
        return epoch % epochs
    raise StoreError(f"logit store {folder} holds {epochs} epoch(s) but the run reached epoch {epoch}; write "
                     f"more with `hpckd teachers cache --epochs {epoch + 1}` or set serving.store_epochs=cycle")


class StoreSource:
    """A :class:`~hpckd.teachers.source.TeacherSource` that reads a :class:`LogitStore` instead of running
    teachers, for the training step: rows by (batch.epoch, batch.index, batch.aug["variant"]).

    Only training batches are stored. The step (:class:`~hpckd.train.step.DistillStep`) marks its teacher calls
    with :meth:`training` (see :func:`~hpckd.teachers.source.training_lookups`); any other call (evaluation on the
    val split, CAMs, ``hpckd eval``) runs the teachers inline, built on first use by ``inline``."""

    def __init__(self, store: LogitStore, device: torch.device | str, metas: Sequence[dict[str, Any]],
                 epochs_policy: str = "error", inline: Callable[[], Any] | None = None) -> None:
        self.store, self.device, self._metas = store, torch.device(device), list(metas)
        self.num_classes = store.num_classes
        self.epochs_policy = epochs_policy
        self._make_inline, self._inline = inline, None
        self._training = 0

    def __len__(self) -> int:
        return self.store.num_teachers

    @property
    def metas(self) -> list[dict[str, Any]]:
        return self._metas

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Calls inside read the store (training batches of the stored epochs)."""
        self._training += 1
        try:
            yield
        finally:
            self._training -= 1

    @property
    def inline(self) -> Any:
        if self._inline is None:
            if self._make_inline is None:
                raise StoreError(f"logit store {self.store.folder} holds training views only; this call needs the "
                                 f"teachers themselves")
            self._inline = self._make_inline()
        return self._inline

    @property
    def precision(self) -> Any:
        """The inline teachers' precision policy (evaluation adjusts it for its pass)."""
        return getattr(self.inline, "precision", None)

    @precision.setter
    def precision(self, policy: Any) -> None:
        self.inline.precision = policy

    def data_epoch(self, epoch: int) -> int:
        """The stored epoch that serves training epoch ``epoch``."""
        return stored_epoch(epoch, self.store.epochs, self.epochs_policy, self.store.folder)

    def check_num_classes(self, num_classes: int) -> None:
        if num_classes != self.num_classes:
            raise StoreError(f"logit store {self.store.folder} holds {self.num_classes}-class logits but the "
                             f"dataset has {num_classes} classes")

    def __call__(self, batch: Any) -> list[torch.Tensor]:
        if not self._training:
            return self.inline(batch)
        epoch = int(batch.epoch)
        if epoch >= self.store.epochs:
            # With serving.store_epochs=cycle the loop sets the loader to data_epoch(e), so batch.epoch < E here.
            if self.epochs_policy == "cycle":
                raise StoreError(f"serving.store_epochs=cycle: epoch {epoch} was not mapped to a stored epoch (the "
                                 f"training loop must set its loader to teachers.data_epoch(epoch))")
            stored_epoch(epoch, self.store.epochs, "error", self.store.folder)
        # Host copies of the ids and variants (Batch.ids / Batch.variants): the lookup reads no device tensor (the
        # training step never passes CutMixPick's device-only output here, only its pool and original rows).
        logits = self.store.logits(epoch, batch.ids(), batch.variants())
        if self.device.type == "cuda":
            # From pinned memory the copy is asynchronous; from pageable memory it would wait for the device queue.
            return [t.pin_memory().to(self.device, non_blocking=True) for t in logits]
        return [t.to(self.device) for t in logits]

    def has_cam_features(self, index: int) -> bool:
        return self._make_inline is not None and self.inline.has_cam_features(index)

    def cam_features(self, batch: Any, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.inline.cam_features(batch, index)

    def has_attention_maps(self, index: int) -> bool:
        """ViT teachers' attention maps come from the inline teachers (the store holds logits only)."""
        return (self._make_inline is not None and isinstance(self.inline, AttentionSource)
                and self.inline.has_attention_maps(index))

    def attention_maps(self, batch: Any, index: int) -> list[torch.Tensor]:
        return self.inline.attention_maps(batch, index)

    def logits_and_maps(self, batch: Any, cams: Sequence[int] = (), attentions: Sequence[int] = ()) -> tuple[
            list[torch.Tensor], dict[int, Any], dict[int, list[torch.Tensor]]]:
        """The inline teachers' logits and maps from one forward each (the evaluation's call; only the training
        step reads the store, and it never asks for maps)."""
        return self.inline.logits_and_maps(batch, cams, attentions)


def open_store(cfg: Any, device: torch.device, serving: Any, inline: Callable[[], Any] | None = None) -> StoreSource:
    """The store-backed teacher source of a ``serving.mode=cached`` run, after checking that the store's key
    (teachers, data, views, batch ops, seed, loader, micro-batch, k) is this run's. ``inline`` builds the teachers
    for what the store does not hold (evaluation)."""
    from hpckd.checkpoint import load_checkpoint
    from hpckd.data.batchops import validated
    from hpckd.data.cutmixpick import needs_student
    from hpckd.config import BatchOpsConfig
    from hpckd.data.datasets import load_splits

    store = LogitStore(serving.store)
    bo = cfg.batch_ops
    bo = validated(bo if isinstance(bo, BatchOpsConfig) else BatchOpsConfig(**{k: bo[k] for k in bo}))
    if needs_student(bo):
        raise StoreError(f"batch_ops.pick_criterion={bo.pick_criterion} scores the CutMixPick pool with the student, "
                         f"which a logit store cannot hold; use pick_criterion=teacher_entropy or serving.mode=inline")
    train_index, _ = load_splits(cfg.data)
    hashes = [file_sha256(t.checkpoint) for t in cfg.teachers]
    store.check_key(store_key(cfg, hashes, train_index.fingerprint(), int(train_index.num_classes),
                              int(store.key.get("topk", 0)), torch.device(device).type))
    metas = [dict(load_checkpoint(t.checkpoint).get("meta") or {}) for t in cfg.teachers]
    return StoreSource(store, device, metas, serving.store_epochs, inline=inline)


def size_report(rows_per_epoch: int, num_classes: int, topk: int, teachers: int, epochs: int) -> tuple[int, int]:
    """(bytes per epoch, bytes in total) of a store."""
    per_epoch = rows_per_epoch * (ROW_BYTES + teachers * bytes_per_row(num_classes, topk))
    return per_epoch, per_epoch * epochs


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


__all__ = ["FORMAT_VERSION", "LogitStore", "POOL_VARIANT", "StoreError", "StoreSource", "Unit", "bytes_per_row",
           "decode", "encode", "file_sha256", "key_difference", "key_hash", "round_trip", "size_report",
           "store_key", "units"]
