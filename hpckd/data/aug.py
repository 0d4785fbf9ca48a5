"""Named augmentation policies, declared once and rendered by both loaders (DALI and torchvision).

A policy is a small declarative :class:`Policy`; ``hpckd.data.dali`` turns it into a DALI graph and
``hpckd.data.torch_loader`` into a torchvision-v2 transform, so ``loader: dali`` and ``loader: torch`` apply the
same augmentation. Strengths follow the attention study (Sec. 5 and its appendix on augmentation):

- imagenet weak   = RandomResizedCrop + horizontal flip + colour jitter (0.4, 0.4, 0.4)
- imagenet strong = weak + RandAugment (n=2, m=10)
- cifar weak      = random crop (pad 4) + horizontal flip + rotation (+-15 degrees)
- cifar strong    = weak + AutoAugment (CIFAR policy) + Cutout 16x16
- none            = resize to the training size only
Evaluation always uses resize + centre crop (imagenet: shorter side to size/0.875 first).
"""

from __future__ import annotations

from dataclasses import dataclass

from hpckd.errors import ConfigError

STRENGTHS = ("none", "weak", "strong")
FAMILIES = ("imagenet", "cifar")


@dataclass(frozen=True)
class Policy:
    name: str
    size: int  # output is size x size
    crop: str  # "rrc" (random resized crop) | "pad_crop" (pad, random crop) | "resize" | "center"
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    pad: int = 4
    flip: bool = False
    rotate: float = 0.0  # max absolute angle in degrees
    jitter: float = 0.0  # brightness/contrast/saturation factor range [1 - j, 1 + j]
    auto: str | None = None  # "randaugment" | "autoaugment_cifar" | "autoaugment_imagenet" | "trivialaugment"
    ra_n: int = 2
    ra_m: int = 10
    cutout: int = 0  # side of the erased square in pixels (0 = off)

    @property
    def is_random(self) -> bool:
        return self.crop in ("rrc", "pad_crop") or self.flip or self.rotate > 0 or self.jitter > 0 or bool(self.auto) or self.cutout > 0


def train_policy(family: str, strength: str, size: int) -> Policy:
    """The training policy ``strength`` of ``family`` at ``size`` px."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown policy family {family!r}; choose one of {', '.join(FAMILIES)}")
    if strength not in STRENGTHS:
        raise ConfigError(f"unknown augmentation strength {strength!r}; choose one of {', '.join(STRENGTHS)}")
    name = f"{family}_{strength}"
    if strength == "none":
        return Policy(name=name, size=size, crop="resize")
    if family == "imagenet":
        weak = Policy(name=name, size=size, crop="rrc", flip=True, jitter=0.4)
        if strength == "weak":
            return weak
        return Policy(name=name, size=size, crop="rrc", flip=True, jitter=0.4, auto="randaugment", ra_n=2, ra_m=10)
    if strength == "weak":
        return Policy(name=name, size=size, crop="pad_crop", pad=4, flip=True, rotate=15.0)
    return Policy(name=name, size=size, crop="pad_crop", pad=4, flip=True, rotate=15.0, auto="autoaugment_cifar", cutout=16 * size // 32)


def eval_policy(family: str, size: int) -> Policy:
    return Policy(name=f"{family}_eval", size=size, crop="center" if family == "imagenet" else "resize")


def resize_for_center_crop(size: int) -> int:
    """Shorter side before the centre crop (the usual 0.875 ratio: 256 for 224)."""
    return int(round(size / 0.875))
