"""Generated ImageFolder data sets with class-dependent content.

Each class is a (hue, stripe orientation, blob shape) combination that survives the studies' augmentations:
flips keep stripe orientation (horizontal vs vertical), colour jitter keeps hue roughly, crops keep stripes
and colour. Per-image noise, phase, stripe frequency, blob position and brightness vary so the task is not
trivial. The output is a standard ``ROOT/{train,val}/class_XXX/NNNNN.jpg`` tree that DALI's file reader and
torchvision's ImageFolder both read.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from hpckd.errors import DataError
from hpckd.io import atomic_open


@dataclass(frozen=True)
class SynthSpec:
    classes: int = 10
    per_class: int = 100  # training images per class
    val_per_class: int = 20
    height: int = 32
    width: int = 32
    seed: int = 0
    quality: int = 90


def class_style(c: int, classes: int) -> tuple[float, int]:
    """Hue in [0, 1) and orientation (0 horizontal stripes, 1 vertical) of class ``c``."""
    n_hues = (classes + 1) // 2
    return (c % n_hues) / n_hues, (c // n_hues) % 2


def render(c: int, spec: SynthSpec, rng: np.random.Generator) -> np.ndarray:
    """One HxWx3 uint8 image of class ``c``."""
    h, w = spec.height, spec.width
    hue, orientation = class_style(c, spec.classes)
    hue = (hue + rng.normal(0.0, 0.06)) % 1.0
    base = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    coord = yy / h if orientation == 0 else xx / w
    freq = rng.uniform(3.0, 5.0)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * coord + rng.uniform(0, 2 * np.pi))
    contrast = rng.uniform(0.3, 0.7)
    img = base[None, None, :] * (1.0 - contrast + contrast * stripes[..., None])
    # A distractor blob of a random colour at a random place: content the model must learn to ignore.
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    radius = rng.uniform(0.15, 0.35) * min(h, w)
    blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < radius**2
    img[blob] = rng.uniform(0, 1, size=3)
    img = img + rng.normal(0.0, 0.08, size=img.shape)
    return (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def write_imagefolder(out: str | Path, spec: SynthSpec) -> dict[str, int]:
    """Write ``out/train`` and ``out/val``; return the number of images written per split."""
    out = Path(out)
    if spec.classes < 2 or spec.per_class < 1 or spec.val_per_class < 1 or min(spec.height, spec.width) < 8:
        raise DataError("data synth: need >= 2 classes, >= 1 image per class and split, and images >= 8x8 px")
    rng = np.random.default_rng(spec.seed)
    counts = {}
    for split, per_class in (("train", spec.per_class), ("val", spec.val_per_class)):
        for c in range(spec.classes):
            folder = out / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                with atomic_open(folder / f"{i:05d}.jpg", "wb") as handle:
                    Image.fromarray(render(c, spec, rng)).save(handle, format="JPEG", quality=spec.quality)
        counts[split] = spec.classes * per_class
    return counts


def parse_size(text: str) -> tuple[int, int]:
    """``"375x500"`` -> (375, 500) as (height, width); ``"32"`` -> (32, 32)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise DataError(f"--size {text!r}: expected HxW such as 32x32 or 375x500") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 8:
        raise DataError(f"--size {text!r}: expected HxW with both sides >= 8")
    return parts[0], parts[1]
