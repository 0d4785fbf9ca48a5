"""CIFAR-10/100 from their official python-pickle batches, read from a local folder (no download).

Layouts (as the official tarballs unpack):

- CIFAR-10:  ``ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` (labels ``labels``,
  names ``label_names``)
- CIFAR-100: ``ROOT/cifar-100-python/{train, test, meta}`` (labels ``fine_labels``, names ``fine_label_names``)

``ROOT`` may also be the batch folder itself. Each batch is a pickle (protocol 2, bytes keys) holding ``data``, a
(N, 3072) uint8 array of 1024 red, 1024 green and 1024 blue values per image in row-major order.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpckd.data.sources import ArraySource
from hpckd.data.index import LabelledIndex
from hpckd.data.subsets import mix
from hpckd.errors import DataError

LAYOUT = {
    "cifar10": {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"],
                "meta": "batches.meta", "labels": b"labels", "names": b"label_names"},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "val": ["test"], "meta": "meta",
                 "labels": b"fine_labels", "names": b"fine_label_names"},
}


@dataclass
class ArrayIndex(LabelledIndex):
    """An in-memory data set with the attributes loaders and results use (like :class:`FolderIndex`)."""

    root: Path
    classes: list[str]
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: list[int]
    files_hash: str  # hash of the batch files' names, sizes and mtimes
    skipped: list[str] = field(default_factory=list)
    subset: np.ndarray | None = None  # positions kept from the full split (long-tailed subsets, data.subset)
    subset_tag: str = ""  # data.subset that produced this index (mixed into the fingerprint)

    @property
    def source(self) -> ArraySource:
        return ArraySource(self.images, label=str(self.root))

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.files_hash.encode())
        if self.subset is not None:
            digest.update(np.ascontiguousarray(self.subset, dtype=np.int64).tobytes())
        return mix(digest.hexdigest()[:16], self.subset_tag)

    def select(self, positions: np.ndarray) -> "ArrayIndex":
        """The subset at ``positions`` (global sample ids are renumbered 0..len-1; ``subset`` keeps the originals)."""
        positions = np.asarray(positions, dtype=np.int64)
        base = positions if self.subset is None else self.subset[positions]
        return ArrayIndex(self.root, self.classes, self.images[positions], [self.labels[i] for i in positions],
                          self.files_hash, list(self.skipped), base, self.subset_tag)


def batch_folder(root: str | Path, which: str) -> Path:
    root = Path(root)
    folder = LAYOUT[which]["folder"]
    for candidate in (root / folder, root):
        if (candidate / LAYOUT[which]["meta"]).is_file():
            return candidate
    raise DataError(f"{which} not found under {root}: expected {root / folder}/{LAYOUT[which]['meta']} "
                    f"(unpack the official python version there)")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"missing CIFAR batch file: {path}")
    try:
        with path.open("rb") as handle:
            return pickle.load(handle, encoding="bytes")
    except Exception as exc:  # truncated or not a pickle
        raise DataError(f"cannot read CIFAR batch {path} ({type(exc).__name__}); re-extract the archive") from None


def load_cifar(root: str | Path, which: str, split: str) -> ArrayIndex:
    """The ``split`` ("train" or "val" = the test batch) of ``which`` ("cifar10" | "cifar100")."""
    if which not in LAYOUT:
        raise DataError(f"unknown CIFAR variant {which!r}; choose cifar10 or cifar100")
    layout = LAYOUT[which]
    folder = batch_folder(root, which)
    meta = _unpickle(folder / layout["meta"])
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[layout["names"]]]
    images, labels, digest = [], [], hashlib.sha256()
    for name in layout[split]:
        path = folder / name
        batch = _unpickle(path)
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{path}: 'data' must be (N, 3072) uint8, got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += [int(v) for v in batch[layout["labels"]]]
        stat = path.stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    stacked = np.ascontiguousarray(np.concatenate(images))
    if len(labels) != len(stacked) or (labels and not 0 <= min(labels) <= max(labels) < len(classes)):
        raise DataError(f"{folder}: labels do not match the images or the {len(classes)} classes")
    return ArrayIndex(folder, classes, stacked, labels, digest.hexdigest())


def write_cifar(root: str | Path, which: str, images: dict[str, np.ndarray], labels: dict[str, list[int]],
                classes: list[str]) -> Path:
    """Write batches in the official format (tests and small local data sets). ``images[split]``: (N, 32, 32, 3)."""
    layout = LAYOUT[which]
    folder = Path(root) / layout["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / layout["meta"]).open("wb") as handle:
        pickle.dump({layout["names"]: [c.encode() for c in classes]}, handle, protocol=2)
    for split in ("train", "val"):
        names = layout[split]
        chunks = np.array_split(np.arange(len(labels[split])), len(names))
        for name, rows in zip(names, chunks):
            data = images[split][rows].transpose(0, 3, 1, 2).reshape(len(rows), 3072)
            batch = {b"data": np.ascontiguousarray(data, dtype=np.uint8), layout["labels"]: [labels[split][i] for i in rows],
                     b"filenames": [f"{name}_{i}.png".encode() for i in rows]}
            with (folder / name).open("wb") as handle:
                pickle.dump(batch, handle, protocol=2)
    return folder
