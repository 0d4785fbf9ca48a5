"""Augmentation policies, declared once and rendered by both loaders (DALI and torchvision).

A policy is a small declarative :class:`Policy`; ``hpckd.data.dali`` turns it into a DALI graph and
``hpckd.data.render_torch`` into torchvision-v2 functional calls, both driven by the same per-sample parameters
(:mod:`hpckd.data.params`), so ``loader: dali`` and ``loader: torch`` apply the same augmentation. A policy is
either *named* (below) or *written in the config* (``data.policies``, parsed by :func:`policy_from_spec`);
``aug: NAME`` and ``teachers[].aug: NAME`` refer to either.

Every policy applies its parts in one fixed order: crop/resize, horizontal flip, vertical flip, rotation, colour
jitter (brightness, contrast, saturation, hue), grayscale, automatic augmentation (AutoAugment / RandAugment /
TrivialAugment), Cutout. (torchvision's ColorJitter draws a random order of its four factors per image; hpckd's is
fixed so that DALI can render it too.) Every part has a DALI rendering with torchvision's meaning, so every policy
runs on both loaders.

Named policies, per study:

The attention study (Guo et al., App. A.1; ``weak``/``strong`` follow ``data.family``):

- imagenet weak   = RandomResizedCrop + horizontal flip + rotation (15 deg) + colour jitter (0.4, 0.4, 0.4)
- imagenet strong = RandomResizedCrop + horizontal flip + colour jitter (0.4) + RandAugment with *up to* 2 ops
  and magnitude *up to* 10 ("a random number of transformation operations (up to 2) ... each with a randomly
  determined magnitude (up to 10)"): per image the op count is uniform in {1, 2} and each op's magnitude bin
  uniform in {0..10} (of 31)
- cifar weak      = random crop (``data.cifar_crop``: pad 4, or RandomResizedCrop 0.2-1 as the text says) + flip
  + rotation 15 + colour jitter 0.4
- cifar strong    = random crop + flip + AutoAugment (CIFAR policy) + Cutout 16x16 (at 32 px); no rotation/jitter
- none            = resize to the training size only
  The text gives no rotation angle or jitter strength; 15 deg and 0.4 are hpckd's (the common torchvision values).
- ``weak_legacy`` / ``strong_legacy``: hpckd's earlier definitions (imagenet weak without rotation, cifar weak
  without jitter, cifar strong with rotation, RandAugment fixed at n=2, m=10), kept to reproduce older runs.

The augmentation study (Wang et al., NeurIPS 2022, Sec. 5): ``identity``, ``flip``, ``flip_crop`` (the base,
"Flip+Crop"), ``cutout``, ``autoaugment``, ``randaugment`` (n=2, m=10 fixed); as a view's policy each is the
standard crop + flip followed by the scheme (``identity``/``flip`` only resize / flip). ``mixup``, ``cutmix`` and
``cutmix_pick`` mix samples, which a per-sample policy cannot: as a view policy they give the standard
``flip_crop`` view, and :mod:`hpckd.data.batchops` mixes on the device. The doubled batch of the study, where the
scheme is applied *after* the standard view x to make x', is a batch op too (``batchops.scheme``).

The fidelity study (Stanton et al., NeurIPS 2021, Sec. 5.1 and App. A.1): the baseline is ``flip_crop`` (flip +
pad-4 crop); ``fidelity_rotate`` (+ RandomRotation(20)), ``fidelity_vflip`` (+ RandomVerticalFlip()),
``fidelity_jitter`` (+ ColorJitter(0.2, 0.2, 0.2, hue=0.2)) and the combinations ``fidelity_rotate_vflip``,
``fidelity_rotate_jitter``, ``fidelity_vflip_jitter``, ``fidelity_combined`` (all three, "Combined Augs").

The response-based study (Song et al., ACM MM 2023, Sec. 5, "Only RandomResizedCrop and RandomHorizontalFlip"):
``rrc_flip`` (RandomResizedCrop 0.08-1 + flip, whatever the family).

Evaluation always uses resize + centre crop (imagenet: shorter side to size/0.875 first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hpckd.errors import ConfigError

STRENGTHS = ("none", "weak", "strong")
LEGACY = ("weak_legacy", "strong_legacy")
FAMILIES = ("imagenet", "cifar")
DA_SCHEMES = ("identity", "flip", "flip_crop", "cutout", "autoaugment", "randaugment", "mixup", "cutmix", "cutmix_pick")
MIXING_SCHEMES = ("mixup", "cutmix", "cutmix_pick")
FIDELITY = ("fidelity_rotate", "fidelity_vflip", "fidelity_jitter", "fidelity_rotate_vflip", "fidelity_rotate_jitter",
            "fidelity_vflip_jitter", "fidelity_combined")
RESPONSE = ("rrc_flip",)
POLICY_NAMES = STRENGTHS + LEGACY + DA_SCHEMES + FIDELITY + RESPONSE
CIFAR_CROPS = ("pad", "rrc")
CROPS = ("rrc", "pad_crop", "resize", "center", "none")
AUTOS = ("randaugment", "autoaugment_cifar", "autoaugment_imagenet", "trivialaugment")


@dataclass(frozen=True)
class Policy:
    """One view's augmentation; every random part's parameters are drawn by :mod:`hpckd.data.params`.

    ``jitter`` is one strength for brightness, contrast and saturation (a float) or three (a tuple); each factor is
    uniform in [max(0, 1 - j), 1 + j] (torchvision's ColorJitter). ``hue`` h draws a hue shift uniform in [-h, h]
    (fractions of the hue circle, h <= 0.5, torchvision's ``adjust_hue``). ``grayscale`` is the probability of
    RandomGrayscale (3 equal channels of ITU-R 601 luma). RandAugment applies ``ra_n`` ops at magnitude bin
    ``ra_m`` of 31, or with ``ra_sample_n`` a per-image op count uniform in {``ra_n_min``..``ra_n``} and with
    ``ra_sample_m`` per-op magnitude bins uniform in {0..``ra_m``} (the attention study's "up to").
    """

    name: str
    size: int  # output is size x size
    crop: str  # "rrc" | "pad_crop" (resize to size, random crop with zero padding) | "resize" | "center" | "none"
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    pad: int = 4
    flip: bool = False  # horizontal, p = 0.5
    rotate: float = 0.0  # max absolute angle in degrees
    jitter: float | tuple[float, float, float] = 0.0  # brightness/contrast/saturation strengths
    auto: str | None = None  # "randaugment" | "autoaugment_cifar" | "autoaugment_imagenet" | "trivialaugment"
    ra_n: int = 2
    ra_m: int = 10
    cutout: int = 0  # side of the erased square in pixels (0 = off)
    vflip: bool = False  # vertical, p = 0.5
    hue: float = 0.0
    grayscale: float = 0.0
    ra_sample_n: bool = False
    ra_sample_m: bool = False
    ra_n_min: int = 1

    @property
    def jitter_strengths(self) -> tuple[float, float, float]:
        """(brightness, contrast, saturation) strengths."""
        if isinstance(self.jitter, (int, float)):
            return (float(self.jitter),) * 3
        b, c, s = (float(v) for v in self.jitter)
        return (b, c, s)

    @property
    def has_jitter(self) -> bool:
        return any(v > 0 for v in self.jitter_strengths)

    @property
    def is_random(self) -> bool:
        return (self.crop in ("rrc", "pad_crop") or self.flip or self.vflip or self.rotate > 0 or self.has_jitter
                or self.hue > 0 or self.grayscale > 0 or bool(self.auto) or self.cutout > 0)


JITTER = 0.4  # colour-jitter strength of the attention study's weak policies (the text gives none)
ROTATE = 15.0  # rotation of the attention study's weak policies (the text gives none)


def train_policy(family: str, strength: str, size: int, cifar_crop: str = "pad",
                 policies: Mapping[str, Any] | None = None) -> Policy:
    """The training policy ``strength`` of ``family`` at ``size`` px: a named policy (module docstring) or one of
    the user policies ``policies`` (``data.policies``: name -> spec, see :func:`policy_from_spec`)."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown policy family {family!r}; choose one of {', '.join(FAMILIES)}")
    if cifar_crop not in CIFAR_CROPS:
        raise ConfigError(f"unknown CIFAR crop {cifar_crop!r}; choose one of {', '.join(CIFAR_CROPS)}")
    if policies and strength in policies:
        return policy_from_spec(strength, policies[strength], family, size, cifar_crop, policies)
    if strength in DA_SCHEMES:
        return scheme_policy(strength, family, size, cifar_crop)
    if strength in FIDELITY:
        return fidelity_policy(strength, family, size, cifar_crop)
    if strength == "rrc_flip":
        return Policy(name=f"{family}_rrc_flip", size=size, crop="rrc", flip=True)
    if strength in LEGACY:
        return legacy_policy(family, strength.split("_")[0], size, cifar_crop)
    if strength not in STRENGTHS:
        known = POLICY_NAMES + tuple(policies or ())
        raise ConfigError(f"unknown augmentation {strength!r}; choose one of {', '.join(known)}")
    name = f"{family}_{strength}"
    if strength == "none":
        return Policy(name=name, size=size, crop="resize")
    if family == "imagenet":
        if strength == "weak":
            return Policy(name=name, size=size, crop="rrc", flip=True, rotate=ROTATE, jitter=JITTER)
        return Policy(name=name, size=size, crop="rrc", flip=True, jitter=JITTER, auto="randaugment", ra_n=2, ra_m=10,
                      ra_sample_n=True, ra_sample_m=True)
    crop = replace(standard_crop(family, size, cifar_crop), name=name, flip=True)
    if strength == "weak":
        return replace(crop, rotate=ROTATE, jitter=JITTER)
    return replace(crop, auto="autoaugment_cifar", cutout=cutout_side(size))


def legacy_policy(family: str, strength: str, size: int, cifar_crop: str = "pad") -> Policy:
    """hpckd's weak/strong before they followed the attention study's App. A.1 (kept to reproduce older runs)."""
    name = f"{family}_{strength}_legacy"
    if family == "imagenet":
        weak = Policy(name=name, size=size, crop="rrc", flip=True, jitter=0.4)
        return weak if strength == "weak" else replace(weak, auto="randaugment", ra_n=2, ra_m=10)
    weak = replace(standard_crop(family, size, cifar_crop), name=name, flip=True, rotate=15.0)
    return weak if strength == "weak" else replace(weak, auto="autoaugment_cifar", cutout=cutout_side(size))


def fidelity_policy(name: str, family: str, size: int, cifar_crop: str = "pad") -> Policy:
    """The fidelity study's augmentations on top of its flip + pad-4 crop baseline (Stanton et al., App. A.1):
    RandomRotation(degrees=20), RandomVerticalFlip(), ColorJitter(0.2, 0.2, 0.2, hue=0.2)."""
    parts = name.split("_")[1:]
    extra: dict[str, Any] = {}
    if "rotate" in parts or "combined" in parts:
        extra["rotate"] = 20.0
    if "vflip" in parts or "combined" in parts:
        extra["vflip"] = True
    if "jitter" in parts or "combined" in parts:
        extra.update(jitter=0.2, hue=0.2)
    base = replace(standard_crop(family, size, cifar_crop), name=f"{family}_{name}", flip=True)
    return replace(base, **extra)


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
        return {"auto": "randaugment", "ra_n": 2, "ra_m": 10}  # the augmentation study's scheme: fixed n, m
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


# --- Policies written in the config (``data.policies``) -------------------------------------------------------

SPEC_KEYS = ("base", "crop", "scale", "pad", "hflip", "vflip", "rotate", "jitter", "hue", "grayscale", "autoaugment",
             "randaugment", "trivialaugment", "cutout")
RANDAUGMENT_KEYS = ("n", "m", "up_to_n", "up_to_m", "n_min")


def _spec_error(where: str, message: str) -> ConfigError:
    return ConfigError(f"config: '{where}' {message}")


def _number(where: str, value: Any, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _spec_error(where, f"is {value!r}; expected a number")
    if value < low or (high is not None and value > high):
        bound = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise _spec_error(where, f"is {value}; choose a value {bound}")
    return float(value)


def _flag(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _spec_error(where, f"is {value!r}; expected true or false")
    return value


def policy_from_spec(name: str, spec: Any, family: str, size: int, cifar_crop: str = "pad",
                     policies: Mapping[str, Any] | None = None, _seen: tuple[str, ...] = ()) -> Policy:
    """The :class:`Policy` a user wrote under ``data.policies.<name>`` (a mapping of the :data:`SPEC_KEYS`).

    The parts apply in the fixed order of the module docstring whatever the order of the keys. ``base`` starts from
    a named policy or another user policy and the other keys override its parts (``rotate: 0`` removes a rotation).
    Every bad key or value is one :class:`ConfigError` naming ``data.policies.<name>.<key>``."""
    where = f"data.policies.{name}"
    if name in POLICY_NAMES:
        raise _spec_error(where, f"shadows the named policy {name!r}; give your policy another name")
    if not isinstance(spec, Mapping):
        raise _spec_error(where, f"must be a mapping of {', '.join(SPEC_KEYS)}")
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise _spec_error(f"{where}.{unknown[0]}", f"is not a policy key; choose from {', '.join(SPEC_KEYS)}")
    if name in _seen:
        raise _spec_error(f"{where}.base", f"forms a cycle ({' -> '.join(_seen + (name,))})")
    base = spec.get("base")
    if base is None:
        policy = Policy(name=name, size=size, crop="resize")
    elif policies and base in policies:
        policy = policy_from_spec(str(base), policies[base], family, size, cifar_crop, policies, _seen + (name,))
    elif base in POLICY_NAMES and base not in MIXING_SCHEMES:
        policy = train_policy(family, str(base), size, cifar_crop)
    else:
        raise _spec_error(f"{where}.base", f"is {base!r}; choose a named policy ({', '.join(POLICY_NAMES)}) or "
                                           f"another of data.policies")
    fields: dict[str, Any] = {"name": name}
    if "crop" in spec:
        crop = spec["crop"]
        if crop not in CROPS:
            raise _spec_error(f"{where}.crop", f"is {crop!r}; choose one of {', '.join(CROPS)}")
        fields["crop"] = crop
    if "scale" in spec:
        scale = spec["scale"]
        if isinstance(scale, str) or not isinstance(scale, Sequence) or len(scale) != 2:
            raise _spec_error(f"{where}.scale", f"is {scale!r}; expected [min, max] area fractions")
        lo, hi = (_number(f"{where}.scale", v, 1e-6, 1.0) for v in scale)
        if lo > hi:
            raise _spec_error(f"{where}.scale", f"is {list(scale)}; min must be <= max")
        fields["rrc_scale"] = (lo, hi)
    if "pad" in spec:
        fields["pad"] = int(_number(f"{where}.pad", spec["pad"], 0, size))
    for key, field_name in (("hflip", "flip"), ("vflip", "vflip")):
        if key in spec:
            fields[field_name] = _flag(f"{where}.{key}", spec[key])
    if "rotate" in spec:
        fields["rotate"] = _number(f"{where}.rotate", spec["rotate"], 0, 180)
    if "jitter" in spec:
        fields.update(_jitter_spec(f"{where}.jitter", spec["jitter"]))
    if "hue" in spec:
        fields["hue"] = _number(f"{where}.hue", spec["hue"], 0, 0.5)
    if "grayscale" in spec:
        fields["grayscale"] = _number(f"{where}.grayscale", spec["grayscale"], 0, 1)
    autos = [k for k in ("autoaugment", "randaugment", "trivialaugment") if spec.get(k) not in (None, False)]
    if len(autos) > 1:
        raise _spec_error(f"{where}.{autos[1]}", f"cannot be combined with {autos[0]}; choose one automatic policy")
    if autos:
        fields.update(_auto_spec(f"{where}.{autos[0]}", autos[0], spec[autos[0]]))
    if "cutout" in spec:
        fields["cutout"] = int(_number(f"{where}.cutout", spec["cutout"], 0, size))
    policy = replace(policy, **fields)
    if policy.crop == "pad_crop" and "pad" not in spec and base is None:
        policy = replace(policy, pad=4 * size // 32 or 1)
    return policy


def _jitter_spec(where: str, value: Any) -> dict[str, Any]:
    """``jitter: 0.4`` (brightness = contrast = saturation) or a mapping of those and ``hue``."""
    if not isinstance(value, Mapping):
        return {"jitter": _number(where, value, 0, 1)}
    keys = ("brightness", "contrast", "saturation", "hue")
    unknown = [k for k in value if k not in keys]
    if unknown:
        raise _spec_error(f"{where}.{unknown[0]}", f"is not a jitter key; choose from {', '.join(keys)}")
    b, c, s = (_number(f"{where}.{k}", value.get(k, 0.0), 0, 1) for k in keys[:3])
    out: dict[str, Any] = {"jitter": (b, c, s)}
    if "hue" in value:
        out["hue"] = _number(f"{where}.hue", value["hue"], 0, 0.5)
    return out


def _auto_spec(where: str, kind: str, value: Any) -> dict[str, Any]:
    if kind == "trivialaugment":
        _flag(where, value)
        return {"auto": "trivialaugment"}
    if kind == "autoaugment":
        if value not in ("cifar", "imagenet"):
            raise _spec_error(where, f"is {value!r}; choose cifar or imagenet (the AutoAugment paper's policies)")
        return {"auto": f"autoaugment_{value}"}
    value = {} if value is True else value
    if not isinstance(value, Mapping):
        raise _spec_error(where, "expects true or a mapping of n, m, up_to_n, up_to_m, n_min")
    unknown = [k for k in value if k not in RANDAUGMENT_KEYS]
    if unknown:
        raise _spec_error(f"{where}.{unknown[0]}", f"is not a RandAugment key; choose from {', '.join(RANDAUGMENT_KEYS)}")
    n = int(_number(f"{where}.n", value.get("n", 2), 1, 16))
    n_min = int(_number(f"{where}.n_min", value.get("n_min", 1), 0, n))
    return {"auto": "randaugment", "ra_n": n, "ra_m": int(_number(f"{where}.m", value.get("m", 9), 0, 30)),
            "ra_sample_n": _flag(f"{where}.up_to_n", value.get("up_to_n", False)),
            "ra_sample_m": _flag(f"{where}.up_to_m", value.get("up_to_m", False)), "ra_n_min": n_min}


def check_policies(policies: Mapping[str, Any] | None, family: str, size: int, cifar_crop: str = "pad") -> None:
    """Parse every user policy once (config validation): the first problem is one :class:`ConfigError`."""
    for name, spec in (policies or {}).items():
        policy_from_spec(str(name), spec, family, size, cifar_crop, policies)

