"""Named augmentation policies, declared once and rendered by both loaders (DALI and torchvision).

A policy is a small declarative :class:`Policy`; ``hpckd.data.dali`` turns it into a DALI graph and
``hpckd.data.render_torch`` into torchvision-v2 functional calls, both driven by the same per-sample parameters
(:mod:`hpckd.data.params`), so ``loader: dali`` and ``loader: torch`` apply the same augmentation.

Strengths follow the attention study (Sec. 5 and its Appendix A.1):

- imagenet weak   = RandomResizedCrop + horizontal flip + colour jitter (0.4, 0.4, 0.4)
- imagenet strong = weak + RandAugment (n=2, m=10)
- cifar weak      = random crop (pad 4, or RandomResizedCrop 0.2-1 with ``cifar_crop="rrc"``) + flip + rotation 15
- cifar strong    = weak + AutoAugment (CIFAR policy) + Cutout 16x16 (at 32 px)
- none            = resize to the training size only
Evaluation always uses resize + centre crop (imagenet: shorter side to size/0.875 first).

The augmentation study's DA schemes (Wang et al., NeurIPS 2022, Sec. 5) are also policy names: ``identity``,
``flip``, ``flip_crop``, ``cutout``, ``autoaugment``, ``randaugment``; as a view's policy each is the standard
crop + flip followed by the scheme (``identity``/``flip`` only resize / flip). ``mixup``, ``cutmix`` and
``cutmix_pick`` mix samples, which a per-sample policy cannot: as a view policy they give the standard
``flip_crop`` view, and :mod:`hpckd.data.batchops` mixes on the device. The doubled batch of the study, where the
scheme is applied *after* the standard view x to make x', is a batch op too (``batchops.scheme``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hpckd.errors import ConfigError

STRENGTHS = ("none", "weak", "strong")
FAMILIES = ("imagenet", "cifar")
DA_SCHEMES = ("identity", "flip", "flip_crop", "cutout", "autoaugment", "randaugment", "mixup", "cutmix", "cutmix_pick")
MIXING_SCHEMES = ("mixup", "cutmix", "cutmix_pick")
POLICY_NAMES = STRENGTHS + DA_SCHEMES
CIFAR_CROPS = ("pad", "rrc")


@dataclass(frozen=True)
class Policy:
    name: str
    size: int  # output is size x size
    crop: str  # "rrc" | "pad_crop" (resize to size, random crop with zero padding) | "resize" | "center" | "none"
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


def train_policy(family: str, strength: str, size: int, cifar_crop: str = "pad") -> Policy:
    """The training policy ``strength`` (a strength or a DA scheme name) of ``family`` at ``size`` px."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown policy family {family!r}; choose one of {', '.join(FAMILIES)}")
    if cifar_crop not in CIFAR_CROPS:
        raise ConfigError(f"unknown CIFAR crop {cifar_crop!r}; choose one of {', '.join(CIFAR_CROPS)}")
    if strength in DA_SCHEMES:
        return scheme_policy(strength, family, size, cifar_crop)
    if strength not in STRENGTHS:
        raise ConfigError(f"unknown augmentation {strength!r}; choose one of {', '.join(POLICY_NAMES)}")
    name = f"{family}_{strength}"
    if strength == "none":
        return Policy(name=name, size=size, crop="resize")
    if family == "imagenet":
        weak = Policy(name=name, size=size, crop="rrc", flip=True, jitter=0.4)
        return weak if strength == "weak" else replace(weak, auto="randaugment", ra_n=2, ra_m=10)
    weak = replace(standard_crop(family, size, cifar_crop), name=name, flip=True, rotate=15.0)
    return weak if strength == "weak" else replace(weak, auto="autoaugment_cifar", cutout=cutout_side(size))


def standard_crop(family: str, size: int, cifar_crop: str = "pad") -> Policy:
    """The standard random crop of a family: RandomResizedCrop (imagenet), pad-4 crop or RRC 0.2-1 (cifar)."""
    if family == "imagenet":
        return Policy(name=f"{family}_crop", size=size, crop="rrc")
    if cifar_crop == "rrc":
        return Policy(name=f"{family}_crop", size=size, crop="rrc", rrc_scale=(0.2, 1.0))
    return Policy(name=f"{family}_crop", size=size, crop="pad_crop", pad=4 * size // 32 or 1)


def cutout_side(size: int) -> int:
    """Cutout square: 16 px at 32 px (DeVries & Taylor 2017 on CIFAR), scaled with the image."""
    return max(1, 16 * size // 32)


def scheme_policy(scheme: str, family: str, size: int, cifar_crop: str = "pad") -> Policy:
    """A DA scheme of the augmentation study as a per-sample view policy (see the module docstring)."""
    name = f"{family}_{scheme}"
    if scheme == "identity":
        return Policy(name=name, size=size, crop="resize")
    if scheme == "flip":
        return Policy(name=name, size=size, crop="resize", flip=True)
    standard = replace(standard_crop(family, size, cifar_crop), name=name, flip=True)
    if scheme in ("flip_crop",) + MIXING_SCHEMES:
        return standard
    return replace(standard, **extra_ops(scheme, family, size))


def extra_ops(scheme: str, family: str, size: int) -> dict:
    """The Policy fields a per-sample scheme adds on top of the standard view."""
    if scheme == "cutout":
        return {"cutout": cutout_side(size)}
    if scheme == "autoaugment":
        return {"auto": "autoaugment_cifar" if family == "cifar" else "autoaugment_imagenet"}
    if scheme == "randaugment":
        return {"auto": "randaugment", "ra_n": 2, "ra_m": 10}
    raise ConfigError(f"DA scheme {scheme!r} is not a per-sample augmentation")


def followup_policy(scheme: str, family: str, size: int, cifar_crop: str = "pad") -> Policy:
    """What the doubled batch applies to the standard view x to make x' (augmentation study Sec. 4.1): the
    scheme alone, on an image that is already ``size`` x ``size`` (``crop="none"`` keeps it as it is)."""
    base = Policy(name=f"followup_{scheme}", size=size, crop="none")
    if scheme == "identity":
        return base
    if scheme == "flip":
        return replace(base, flip=True)
    if scheme == "flip_crop":
        crop = standard_crop(family, size, cifar_crop)
        return replace(crop, name=base.name, flip=True)
    return replace(base, **extra_ops(scheme, family, size))


def eval_policy(family: str, size: int) -> Policy:
    return Policy(name=f"{family}_eval", size=size, crop="center" if family == "imagenet" else "resize")


def resize_for_center_crop(size: int) -> int:
    """Shorter side before the centre crop (the usual 0.875 ratio: 256 for 224)."""
    return int(round(size / 0.875))
