"""Automatic augmentation (RandAugment, AutoAugment, TrivialAugment) as explicit, replayable programs.

A *program* is, per sample, K stages of (op id, magnitude bin, sign): stage k applies ``suite.ops[op id]`` with
magnitude ``linspace(lo, hi, bins)[bin]``, negated when ``sign`` is 1 and the op is signed. The identity op fills
stages that do not run. Programs are drawn here, in numpy, from counter-based uniforms (:mod:`hpckd.data.rand`),
and rendered by both back ends: DALI (``nvidia.dali.auto_aug.core.select`` on the recorded op ids) and torch
(:mod:`hpckd.data.render_torch`). Because the program is data, a logit store can record it and replay it.

Op magnitudes follow torchvision's augmentation spaces (which follow the papers) so ``loader: dali`` and
``loader: torch`` apply the same operation at the same strength; units are chosen to be back-end neutral:
translations are fractions of the image side, posterize counts the bits *kept*, solarize is a threshold on 0-255.

- RandAugment (Cubuk et al., CVPR-W 2020): n ops drawn uniformly from the 14-op suite, magnitude bin m of 31,
  each signed op negated with probability 1/2.
- AutoAugment (Cubuk et al., CVPR 2019): one of 25 sub-policies drawn uniformly; each of its 2 stages runs with
  its probability at its magnitude bin of 10. The sub-policy tables are torchvision's (CIFAR10, IMAGENET).
- TrivialAugment-Wide (Müller & Hutter, ICCV 2021): one op and one magnitude bin of 31, both uniform.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from hpckd.errors import ConfigError


@dataclass(frozen=True)
class Op:
    name: str
    lo: float = 0.0
    hi: float = 0.0
    signed: bool = False

    def magnitude(self, bin_: int, bins: int, negate: bool) -> float:
        """The op parameter for ``bin_`` of ``bins`` (``linspace(lo, hi, bins)``), negated for signed ops."""
        value = float(np.linspace(self.lo, self.hi, bins, dtype=np.float32)[bin_]) if bins > 1 else float(self.lo)
        return -value if (negate and self.signed) else value


@dataclass(frozen=True)
class Suite:
    name: str
    ops: tuple[Op, ...]
    bins: int

    def index(self, name: str) -> int:
        return [op.name for op in self.ops].index(name)


_TRANSLATE_REL = 150.0 / 331.0  # torchvision: 150/331 of the image side


def _base_ops(enhance: float, rotate: float, shear: float, translate: float, poster_min_bits: float) -> tuple[Op, ...]:
    return (
        Op("identity"),
        Op("shear_x", 0.0, shear, True),
        Op("shear_y", 0.0, shear, True),
        Op("translate_x", 0.0, translate, True),
        Op("translate_y", 0.0, translate, True),
        Op("rotate", 0.0, rotate, True),
        Op("brightness", 0.0, enhance, True),
        Op("color", 0.0, enhance, True),
        Op("contrast", 0.0, enhance, True),
        Op("sharpness", 0.0, enhance, True),
        Op("posterize", 8.0, poster_min_bits),
        Op("solarize", 255.0, 0.0),
        Op("auto_contrast"),
        Op("equalize"),
    )


RANDAUGMENT = Suite("randaugment", _base_ops(0.9, 30.0, 0.3, _TRANSLATE_REL, 4.0), bins=31)
# TrivialAugment-Wide: translate 32 px is expressed relative to its 224 px reference.
TRIVIALAUGMENT = Suite("trivialaugment", _base_ops(0.99, 135.0, 0.99, 32.0 / 224.0, 2.0), bins=31)
AUTOAUGMENT_OPS = Suite("autoaugment", _base_ops(0.9, 30.0, 0.3, _TRANSLATE_REL, 4.0) + (Op("invert"),), bins=10)

_TV_NAMES = {"ShearX": "shear_x", "ShearY": "shear_y", "TranslateX": "translate_x", "TranslateY": "translate_y",
             "Rotate": "rotate", "Brightness": "brightness", "Color": "color", "Contrast": "contrast",
             "Sharpness": "sharpness", "Posterize": "posterize", "Solarize": "solarize",
             "AutoContrast": "auto_contrast", "Equalize": "equalize", "Invert": "invert"}


@lru_cache(maxsize=None)
def autoaugment_table(which: str) -> np.ndarray:
    """(25, 2, 3) float array of (op id in AUTOAUGMENT_OPS, probability, magnitude bin) per sub-policy stage.

    The sub-policies are read from torchvision (``cifar`` = AutoAugmentPolicy.CIFAR10, ``imagenet`` = IMAGENET),
    the tables of the AutoAugment paper's appendix."""
    from torchvision.transforms import v2

    policy = {"cifar": v2.AutoAugmentPolicy.CIFAR10, "imagenet": v2.AutoAugmentPolicy.IMAGENET}[which]
    table = []
    for sub in v2.AutoAugment(policy)._policies:
        table.append([[AUTOAUGMENT_OPS.index(_TV_NAMES[name]), p, 0 if mag is None else mag] for name, p, mag in sub])
    return np.asarray(table, dtype=np.float64)


def suite_of(auto: str) -> Suite:
    if auto == "randaugment":
        return RANDAUGMENT
    if auto in ("autoaugment_cifar", "autoaugment_imagenet"):
        return AUTOAUGMENT_OPS
    if auto == "trivialaugment":
        return TRIVIALAUGMENT
    raise ConfigError(f"unknown automatic augmentation {auto!r}")


def stages(auto: str, ra_n: int) -> int:
    return ra_n if auto == "randaugment" else (2 if auto.startswith("autoaugment") else 1)


def slots(auto: str, ra_n: int, sample: bool = False) -> int:
    """Uniform draws one sample's program needs (``sample``: RandAugment draws its op count and magnitudes)."""
    if auto == "randaugment":
        # op, sign per stage; then the op count and one magnitude per stage, after them so that a fixed-n program
        # draws the same ops as before
        return 2 * ra_n + (1 + ra_n if sample else 0)
    if auto.startswith("autoaugment"):
        return 1 + 2 * 2  # sub-policy; run?, sign per stage
    return 3  # op, bin, sign


def draw_program(auto: str, u: np.ndarray, ra_n: int = 2, ra_m: int = 10, sample_n: bool = False,
                 sample_m: bool = False, n_min: int = 1) -> dict[str, np.ndarray]:
    """Programs for a batch from uniforms ``u`` of shape (B, slots(auto, ra_n, sample_n or sample_m)): ops, mags
    (bins), signs (B, K).

    RandAugment with ``sample_n`` runs a per-image number of ops uniform in {n_min..ra_n} (the stages after it
    are identity) and with ``sample_m`` gives each op a magnitude bin uniform in {0..ra_m}: the attention study's
    "a random number of transformation operations (up to 2) ... each with a randomly determined magnitude (up to
    10)" (App. A.1)."""
    b = u.shape[0]
    suite = suite_of(auto)
    n_ops = len(suite.ops)
    if auto == "randaugment":
        if not 0 <= ra_m < suite.bins:
            raise ConfigError(f"RandAugment magnitude m={ra_m} must be in [0, {suite.bins - 1}]")
        ops = np.minimum((u[:, 0:2 * ra_n:2] * n_ops).astype(np.int32), n_ops - 1)
        mags = np.full((b, ra_n), ra_m, dtype=np.int32)
        signs = (u[:, 1:2 * ra_n:2] < 0.5).astype(np.int32)
        if sample_n or sample_m:
            extra = u[:, 2 * ra_n:]
            if sample_n:
                count = n_min + np.minimum((extra[:, 0] * (ra_n - n_min + 1)).astype(np.int32), ra_n - n_min)
                ops = np.where(np.arange(ra_n)[None, :] < count[:, None], ops, suite.index("identity")).astype(np.int32)
            if sample_m:
                mags = np.minimum((extra[:, 1:1 + ra_n] * (ra_m + 1)).astype(np.int32), ra_m)
    elif auto.startswith("autoaugment"):
        table = autoaugment_table("cifar" if auto == "autoaugment_cifar" else "imagenet")
        sub = np.minimum((u[:, 0] * len(table)).astype(np.int64), len(table) - 1)
        chosen = table[sub]  # (B, 2, 3)
        runs = u[:, 1:3] < chosen[:, :, 1]
        ops = np.where(runs, chosen[:, :, 0], suite.index("identity")).astype(np.int32)
        mags = np.where(runs, chosen[:, :, 2], 0).astype(np.int32)
        signs = (u[:, 3:5] < 0.5).astype(np.int32)
    else:
        ops = np.minimum((u[:, 0:1] * n_ops).astype(np.int32), n_ops - 1)
        mags = np.minimum((u[:, 1:2] * suite.bins).astype(np.int32), suite.bins - 1)
        signs = (u[:, 2:3] < 0.5).astype(np.int32)
    return {"ops": ops, "mags": mags, "signs": signs}
