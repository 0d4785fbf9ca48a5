"""Generated ImageFolder data sets with class-dependent content.

A class is a (foreground shape, background stripe orientation) combination chosen to survive the
studies' augmentations: shapes and stripe orientation (horizontal vs vertical) survive flips, small rotations,
crops, colour jitter and AutoAugment/RandAugment's colour operations (inversion, solarise, posterise), which would
wipe out a purely colour-coded class. The foreground hue follows the class too (a cue that is quick to learn but
that colour augmentations break), so weakly and strongly augmented models learn different mixtures of cues.
Per-image position, size, colours, stripe frequency/phase/contrast and noise vary, so the task is learnable but
not trivial. The output is a standard ``ROOT/{train,val}/class_XXX/NNNNN.jpg`` tree that DALI's file reader and
torchvision's ImageFolder both read, written whole or not at all (temp folder, then rename) with a completion
marker (``ROOT/.hpckd-synth.json``) that :func:`is_complete` checks.
"""

from __future__ import annotations

import colorsys
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from hpckd.errors import DataError
from hpckd.io import (WriteError, as_write_error, atomic_open, temp_folder_beside, atomic_write_json, check_output_dir,
                      current_umask)


@dataclass(frozen=True)
class SynthSpec:
    classes: int = 10
    per_class: int = 100  # training images per class
    val_per_class: int = 20
    height: int = 32
    width: int = 32
    seed: int = 0
    quality: int = 90


SHAPES = ("disk", "square", "triangle", "ring", "cross")


def class_style(c: int) -> tuple[int, int]:
    """(shape id, stripe orientation 0 horizontal / 1 vertical) of class ``c``."""
    # Orientation varies fastest, so even a 2- or 4-class set has a cue next to the shape.
    return (c // 2) % len(SHAPES), c % 2


def shape_mask(shape: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean mask of ``SHAPES[shape]`` centred at (cy, cx) with half-size ``r``."""
    dy, dx = yy - cy, xx - cx
    if shape == 0:
        return dy**2 + dx**2 < r**2
    if shape == 1:
        return (np.abs(dy) < 0.85 * r) & (np.abs(dx) < 0.85 * r)
    if shape == 2:  # apex up: horizontal flips keep it, the studies' rotations (<= 15 degrees) barely move it
        return (dy < 0.8 * r) & (dy > -r + 2 * np.abs(dx))
    if shape == 3:
        d2 = dy**2 + dx**2
        return (d2 < r**2) & (d2 > (0.55 * r) ** 2)
    return ((np.abs(dy) < 0.3 * r) & (np.abs(dx) < r)) | ((np.abs(dx) < 0.3 * r) & (np.abs(dy) < r))


def render(c: int, spec: SynthSpec, rng: np.random.Generator) -> np.ndarray:
    """One HxWx3 uint8 image of class ``c``."""
    h, w = spec.height, spec.width
    shape, orientation = class_style(c)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    coord = yy / h if orientation == 0 else xx / w
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2.5, 4.5) * coord + rng.uniform(0, 2 * np.pi))
    contrast = rng.uniform(0.35, 0.75)
    background = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.2, 0.8), rng.uniform(0.5, 1.0)))
    img = background[None, None, :] * (1.0 - contrast + contrast * stripes[..., None])
    # The foreground hue is a second, redundant class cue: quick to learn, but colour augmentations
    # (inversion, solarise, colour) break it, so strongly augmented models must lean on the shape.
    fg_hue = (c + rng.uniform(-0.6, 0.6)) / spec.classes  # neighbouring classes overlap: colour alone is not enough
    foreground = np.array(colorsys.hsv_to_rgb(fg_hue % 1.0, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)))
    r = rng.uniform(0.22, 0.34) * min(h, w)
    cy, cx = rng.uniform(0.38, 0.62) * h, rng.uniform(0.38, 0.62) * w
    img[shape_mask(shape, yy, xx, cy, cx, r)] = foreground
    img = img + rng.normal(0.0, 0.07, size=img.shape)
    return (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


GENERATOR_VERSION = 1  # bump when render() changes: a set written by older code then counts as stale
MARKER = ".hpckd-synth.json"
# What a folder written by write_imagefolder may hold; such a folder may be replaced by a new set.
_GENERATED_ENTRIES = ("train", "val", MARKER)


def spec_fingerprint(spec: SynthSpec) -> str:
    """Identifies the images a spec generates (the spec's fields and the generator's version)."""
    text = json.dumps({"version": GENERATOR_VERSION, **dataclasses.asdict(spec)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_complete(out: str | Path, spec: SynthSpec) -> bool:
    """True when ``out`` holds the complete set that ``spec`` generates (its completion marker matches)."""
    try:
        marker = json.loads((Path(out) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("fingerprint") == spec_fingerprint(spec)


def write_imagefolder(out: str | Path, spec: SynthSpec) -> dict[str, int]:
    """Write ``out/train`` and ``out/val``; return the number of images written per split.

    The set is written into a temp folder next to ``out`` and renamed into place once complete, with a marker
    holding the spec's fingerprint (:func:`is_complete`): a killed run leaves no partial set that a later run
    could take for the real one. ``out`` may be missing, empty, or an earlier generated set (replaced)."""
    out = Path(out)
    if spec.classes < 2 or spec.per_class < 1 or spec.val_per_class < 1 or min(spec.height, spec.width) < 8:
        raise DataError("data synth: need >= 2 classes, >= 1 image per class and split, and images >= 8x8 px")
    _check_replaceable(out)
    remove_stale_temp_folders(out)
    tmp = temp_folder_beside(out, _temp_prefix(out))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; a shared data set must be readable
        counts = _write_splits(tmp, spec)
        atomic_write_json(tmp / MARKER, {"fingerprint": spec_fingerprint(spec), "spec": dataclasses.asdict(spec),
                                         "counts": counts})
        _move_into_place(tmp, out)
    except OSError as exc:  # a full disk: one line naming the file as the user knows it, not its temp folder
        shutil.rmtree(tmp, ignore_errors=True)
        error = (WriteError(str(exc).replace(str(tmp), str(out))) if isinstance(exc, WriteError)
                 else as_write_error(out, exc))
        if error is None:
            raise
        error.errno = exc.errno
        raise error from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def _write_splits(root: Path, spec: SynthSpec) -> dict[str, int]:
    rng = np.random.default_rng(spec.seed)
    counts = {}
    for split, per_class in (("train", spec.per_class), ("val", spec.val_per_class)):
        for c in range(spec.classes):
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                with atomic_open(folder / f"{i:05d}.jpg", "wb") as handle:
                    Image.fromarray(render(c, spec, rng)).save(handle, format="JPEG", quality=spec.quality)
        counts[split] = spec.classes * per_class
    return counts


def _temp_prefix(out: Path) -> str:
    # The writer's host and pid in the name: a later run removes only folders whose writer is gone.
    return f".{out.name}.synth-{socket.gethostname()}-{os.getpid()}-"


def remove_stale_temp_folders(out: Path) -> list[Path]:
    """Remove temp folders that killed writers of ``out`` left beside it (not those of live writers here)."""
    removed = []
    for folder in sorted(out.parent.glob(f".{out.name}.synth-*.tmp")) if out.parent.is_dir() else []:
        writer = folder.name[len(f".{out.name}.synth-"):].rsplit("-", 2)
        if len(writer) == 3 and writer[0] == socket.gethostname() and _alive(writer[1]):
            continue
        if len(writer) == 3 and writer[0] != socket.gethostname():
            continue  # another machine's writer: it may still be running
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # somebody else's live process
    return True


def _check_replaceable(out: Path) -> None:
    check_output_dir(out, "--out")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in _GENERATED_ENTRIES and not _is_index_cache(p))
        if other:
            raise DataError(f"--out {out} is not empty and not a generated data set (it holds {', '.join(other[:3])}"
                            f"{', ...' if len(other) > 3 else ''}); choose a new or empty folder")


def _is_index_cache(path: Path) -> bool:
    # The file-index caches hpckd writes next to a split (hpckd.data.index_cache); stale once the set is replaced.
    return path.name.startswith(".hpckd-index-")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished set to ``out``; an earlier set there is moved aside first and removed after."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), suffix=".tmp", dir=out.parent))
        os.rename(out, old / "old")
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def parse_size(text: str) -> tuple[int, int]:
    """``"375x500"`` -> (375, 500) as (height, width); ``"32"`` -> (32, 32)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError as exc:
        raise DataError(f"--size {text!r}: expected HxW such as 32x32 or 375x500") from exc
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 8:
        raise DataError(f"--size {text!r}: expected HxW with both sides >= 8")
    return parts[0], parts[1]
