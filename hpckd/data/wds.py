"""WebDataset tar shards: written from an index (``hpckd data shard``), read by DALI for multi-node streaming.

Shard layout: ``OUT/shard-000000.tar ...``, each member group ``<key>.<jpg|jpeg|png>`` (the encoded image, as
it was), ``<key>.cls`` (int32 little-endian class id) and ``<key>.id`` (int64 little-endian global sample id).
Labels are fixed-size binary on purpose: DALI's iterator needs dense tensors, and text labels of different
lengths ("7" vs "42") are not. Samples are written in a seeded random order, so every contiguous range of
samples (what DALI gives one rank) holds all classes. ``OUT/wds.json`` is the manifest: classes, labels by
sample id, shards with their sample counts, the member offsets (random access for the torch loader) and the
fingerprint of the source data (a sharded copy keeps the fingerprint of the data it came from, so results and
logit stores match across formats).

Reading (:class:`WdsSource`): DALI's ``fn.readers.webdataset`` streams the shards of rank ``(rank + epoch) mod
world`` (the rotation moves data between ranks across epochs), shuffled in a buffer of ``initial_fill`` samples
with a seed from (seed, epoch, rank); the loader then decodes and augments with parameters keyed by the sample
ids it read, exactly as for folders. Resuming mid-epoch re-reads (without decoding) the batches before the step.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from hpckd.data.sharding import ShardSpec, shard_range, steps_per_epoch
from hpckd.data.sources import image_size
from hpckd.data.index import LabelledIndex
from hpckd.data.subsets import mix
from hpckd.errors import DataError
from hpckd.io import atomic_open, atomic_write_json, atomic_write_text

MANIFEST = "wds.json"
IMAGE_EXTS = "jpg;jpeg;png"


def write_shards(index, out: str | Path, max_count: int = 1000, seed: int = 0) -> dict:
    """Write ``index`` (a :class:`~hpckd.data.index.FolderIndex`) as tar shards of at most ``max_count`` samples.

    Sample ids stay those of the index. Returns the manifest (also written to ``out/wds.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if max_count < 1:
        raise DataError("--max-count must be >= 1")
    order = np.random.default_rng(seed).permutation(len(index))
    shards, offsets = [], np.zeros((len(index), 3), dtype=np.int64)  # (shard, offset, size) per sample id
    for number, start in enumerate(range(0, len(order), max_count)):
        ids = order[start:start + max_count]
        name = f"shard-{number:06d}.tar"
        lines = []
        with atomic_open(out / name, "wb") as handle:
            with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for i in ids:
                    path = Path(index.files[i])
                    key = f"{int(i):09d}"
                    members = [(path.suffix.lower().lstrip("."), path.read_bytes()),
                               ("cls", np.int32(index.labels[i]).tobytes()), ("id", np.int64(i).tobytes())]
                    parts = []
                    for ext, data in members:
                        offset = _add(tar, f"{key}.{ext}", data)
                        parts.append(f"{ext} {offset} {len(data)} {key}.{ext}")
                    offsets[i] = (number, int(parts[0].split()[1]), len(members[0][1]))
                    lines.append(" ".join(parts))
        # DALI's index format (as its wds2idx writes it): saves the reader a scan of every tar at start-up.
        atomic_write_text(out / f"shard-{number:06d}.idx", f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
        shards.append({"path": name, "index": f"shard-{number:06d}.idx", "count": int(len(ids))})
    manifest = {"format": "hpckd-wds-1", "classes": list(index.classes), "labels": [int(v) for v in index.labels],
                "count": len(index), "shards": shards, "offsets": offsets.tolist(), "fingerprint": index.fingerprint(),
                "source": str(index.root), "shuffle_seed": seed}
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one member; returns the offset of its data in the tar file."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # reproducible shards
    offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))
    tar.addfile(info, io.BytesIO(data))
    return offset


@dataclass
class WdsIndex(LabelledIndex):
    """A sharded data set with the attributes loaders and results use (like :class:`FolderIndex`)."""

    root: Path
    classes: list[str]
    labels: list[int]
    shards: list[dict]
    offsets: np.ndarray
    source_fingerprint: str
    skipped: list[str] = field(default_factory=list)
    subset: np.ndarray | None = None  # positions kept from the full shards (data.subset, data.imbalance)
    subset_tag: str = ""  # data.subset that produced this index (mixed into the fingerprint)

    @property
    def source(self) -> "WdsRandomAccess":
        # A subset is read by random access (its sample ids are renumbered; DALI's sequential reader would
        # return every sample of the shards with the full set's ids).
        return WdsSource(self) if self.subset is None else WdsRandomAccess(self)

    def fingerprint(self) -> str:
        if self.subset is None:
            return mix(self.source_fingerprint, self.subset_tag)
        digest = hashlib.sha256(self.source_fingerprint.encode())
        digest.update(np.ascontiguousarray(self.subset, dtype=np.int64).tobytes())
        return mix(digest.hexdigest()[:16], self.subset_tag)

    def select(self, positions) -> "WdsIndex":
        """The subset at ``positions``; sample ids are renumbered 0..len-1 (``subset`` keeps the originals)."""
        positions = np.asarray(positions, dtype=np.int64)
        base = positions if self.subset is None else self.subset[positions]
        return WdsIndex(self.root, self.classes, [self.labels[i] for i in positions], self.shards,
                        self.offsets[positions], self.source_fingerprint, list(self.skipped), base, self.subset_tag)

    @property
    def paths(self) -> list[str]:
        return [str(self.root / s["path"]) for s in self.shards]

    @property
    def index_paths(self) -> list[str] | None:
        paths = [self.root / s["index"] for s in self.shards if s.get("index")]
        return [str(p) for p in paths] if len(paths) == len(self.shards) and all(p.is_file() for p in paths) else None


def load_wds(folder: str | Path) -> WdsIndex:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(f"no WebDataset manifest {path}; write shards with `hpckd data shard --src DIR --out {folder}`")
    try:
        m = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON; re-run `hpckd data shard`") from exc
    missing = [s["path"] for s in m["shards"] if not (folder / s["path"]).is_file()]
    if missing:
        raise DataError(f"{folder}: missing shard file(s) {missing[:3]} named in {MANIFEST}")
    return WdsIndex(folder.resolve(), list(m["classes"]), list(m["labels"]), list(m["shards"]),
                    np.asarray(m["offsets"], dtype=np.int64).reshape(-1, 3), str(m["fingerprint"]))


class WdsRandomAccess:
    """Encoded images of a sharded data set, read by id from the member offsets (``read``)."""

    encoded = True

    def __init__(self, index: WdsIndex) -> None:
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def read(self, i: int) -> np.ndarray:
        shard, offset, size = (int(v) for v in self.index.offsets[i])
        with open(self.index.paths[shard], "rb") as handle:
            handle.seek(offset)
            return np.frombuffer(handle.read(size), dtype=np.uint8)

    def size(self, i: int, data: np.ndarray) -> tuple[int, int]:
        return image_size(data, self.name(i))

    def name(self, i: int) -> str:
        return f"{self.index.paths[int(self.index.offsets[i][0])]}:{int(i):09d}"


class WdsSource(WdsRandomAccess):
    """Encoded images of a whole sharded data set: random access by id and DALI streaming (``stream``)."""

    def stream(self, *, epoch: int, shard: ShardSpec, batch_size: int, train: bool, seed: int, start: int,
               num_threads: int = 1, initial_fill: int = 1024) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        """Batches (sample ids, encoded images) of this rank's epoch from DALI's webdataset reader, from batch
        ``start`` on (earlier batches are read and dropped: the reader's shuffle cannot seek)."""
        from nvidia.dali import fn, pipeline_def, types

        from hpckd.data.params import view_key
        from hpckd.data.rand import key_base

        n = len(self)
        reader_shard = ShardSpec((shard.shard_id + epoch) % shard.num_shards if train else shard.shard_id,
                                 shard.num_shards)
        lo, hi = shard_range(n, reader_shard)
        total = steps_per_epoch(n, shard, batch_size, True) * batch_size if train else hi - lo
        reader_seed = key_base(view_key(seed, epoch, f"wds-reader-{shard.shard_id}")) >> 33

        @pipeline_def(batch_size=batch_size, num_threads=max(1, num_threads), device_id=None, seed=reader_seed)
        def reader():
            image, ids = fn.readers.webdataset(paths=self.index.paths, index_paths=self.index.index_paths,
                                               ext=[IMAGE_EXTS, "id"],
                                               dtypes=[types.UINT8, types.INT64], shard_id=reader_shard.shard_id,
                                               num_shards=reader_shard.num_shards, random_shuffle=train,
                                               initial_fill=initial_fill, pad_last_batch=True, stick_to_shard=True,
                                               name="WdsReader")
            return image, ids

        pipe = reader()
        pipe.build()
        produced = 0
        step = 0
        while produced < total:
            images, ids = pipe.run()
            take = min(batch_size, total - produced)
            produced += take
            if step >= start:
                yield (np.array([int(np.array(ids[k]).reshape(-1)[0]) for k in range(take)], dtype=np.int64),
                       [np.array(images[k]) for k in range(take)])
            step += 1
        del pipe
