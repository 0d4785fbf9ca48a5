"""Real images that ship with a dependency: scikit-learn's 1,797 handwritten digits as an ImageFolder.

``sklearn.datasets.load_digits`` holds 8x8 grey images with values 0..16 (no download: the file is inside the
scikit-learn package). :func:`write_digits` writes them once as ``ROOT/train/digit_<d>/<i>.png`` and
``ROOT/val/digit_<d>/<i>.png`` (``i``: the sample's index in ``load_digits``), 10 classes, each image scaled to
0..255 (``round(v * 255 / 16)``), enlarged to ``size`` x ``size`` with nearest-neighbour resampling (exactly
``size / 8`` copies of each pixel when ``size`` is a multiple of 8) and stored as an RGB PNG (lossless, three equal
channels, so every loader decodes it the same way). The val split takes ``round(n_c * val_fraction)`` samples of
each class ``c``, chosen by a permutation seeded with ``seed``: deterministic and stratified.

Like :mod:`hpckd.data.synth`, the set is written into a temp folder beside ``ROOT`` and renamed into place with a
completion marker (``ROOT/.hpckd-digits.json``) holding the spec's fingerprint; :func:`ensure_digits` writes it
only when that marker is missing or different, so a killed writer never leaves a set that passes for complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from hpckd.errors import DataError
from hpckd.io import atomic_write_json

MARKER = ".hpckd-digits.json"
WRITER_VERSION = 1
CLASSES = 10


@dataclass(frozen=True)
class DigitsSpec:
    size: int = 32
    val_fraction: float = 0.2
    seed: int = 0


def spec_fingerprint(spec: DigitsSpec) -> str:
    text = json.dumps({"version": WRITER_VERSION, **dataclasses.asdict(spec)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_complete(root: str | os.PathLike, spec: DigitsSpec) -> bool:
    try:
        marker = json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("fingerprint") == spec_fingerprint(spec)


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8) scaled 0..16 -> 0..255, labels int (1797,)) from scikit-learn."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sample indices: per class, the first ``round(n_c * val_fraction)`` of a seeded permutation go
    to val. Sorted, so files are written in index order."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(CLASSES):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(len(members) * val_fraction))
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    return np.array(sorted(train)), np.array(sorted(val))


def render(image: np.ndarray, size: int) -> Image.Image:
    """One 8x8 uint8 digit as a ``size`` x ``size`` RGB image (nearest-neighbour enlargement)."""
    grey = Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.NEAREST)
    return grey.convert("RGB")


def write_digits(root: str | os.PathLike, spec: DigitsSpec) -> dict[str, int]:
    """Write the set at ``root`` (replacing an earlier digits set there); returns the images per split."""
    root = Path(root)
    if spec.size < 8 or not 0 < spec.val_fraction < 1:
        raise DataError(f"digits: size must be >= 8 and val_fraction in (0, 1), got {spec.size}, {spec.val_fraction}")
    if root.is_dir():
        other = sorted(p.name for p in root.iterdir()
                       if p.name not in ("train", "val", MARKER) and not p.name.startswith(".hpckd-index-"))
        if other:
            raise DataError(f"{root} is not empty and not a digits set (it holds {', '.join(other[:3])}); "
                            f"give the data set its own data.root")
    images, labels = load_digits_uint8()
    train, val = split_indices(labels, spec.val_fraction, spec.seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.digits-", suffix=".tmp", dir=root.parent))
    try:
        os.chmod(tmp, 0o755)
        counts = {}
        for split, indices in (("train", train), ("val", val)):
            for i in indices:
                folder = tmp / split / f"digit_{labels[i]}"
                folder.mkdir(parents=True, exist_ok=True)
                render(images[i], spec.size).save(folder / f"{i:04d}.png", format="PNG")
            counts[split] = len(indices)
        atomic_write_json(tmp / MARKER, {"fingerprint": spec_fingerprint(spec), "spec": dataclasses.asdict(spec),
                                         "counts": counts})
        old = None
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.digits-old-", suffix=".tmp", dir=root.parent))
            os.rename(root, old / "old")
        os.rename(tmp, root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def ensure_digits(root: str | os.PathLike, spec: DigitsSpec) -> str:
    """Write the digits set at ``root`` unless the complete set of ``spec`` is there; says what it did."""
    if is_complete(root, spec):
        return "already there"
    counts = write_digits(root, spec)
    return (f"wrote scikit-learn's digits: {counts['train']} train / {counts['val']} val PNGs (10 classes, "
            f"{spec.size}x{spec.size})")
