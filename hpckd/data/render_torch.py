"""Torch rendering of a :class:`~hpckd.data.aug.Policy` from explicit parameters (:mod:`hpckd.data.params`).

This is the loader: torch path and the replay path: given a decoded image (uint8 CHW tensor, on any device) and
the parameters recorded for a view, :func:`render` reproduces that view exactly (same device, same library
versions). It uses torchvision-v2 functional ops only, so it runs on the GPU when the image is there.

DALI and torch render the same parameters with the same meaning (same window, same flip, same angle, same op at
the same magnitude) but not bit-identically: resampling filters and colour maths differ in the last grey level.
A logit store therefore replays a view with the back end that produced it.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from hpckd.data import autoaug
from hpckd.data.aug import Policy, resize_for_center_crop

BILINEAR = InterpolationMode.BILINEAR


def geometry(img: torch.Tensor, policy: Policy, p: Mapping[str, np.ndarray]) -> torch.Tensor:
    """Crop/resize, flip and rotation of one uint8 CHW image."""
    s = policy.size
    if policy.crop == "rrc":
        top, left, h, w = (int(v) for v in p["crop"])
        img = F.resized_crop(img, top, left, h, w, [s, s], interpolation=BILINEAR, antialias=True)
    elif policy.crop == "pad_crop":
        img = F.resize(img, [s, s], interpolation=BILINEAR, antialias=True)
        top, left = int(p["crop"][0]), int(p["crop"][1])
        img = F.crop(img, top, left, s, s)  # out-of-image rows/columns are zero padding
    elif policy.crop == "center":
        img = F.resize(img, resize_for_center_crop(s), interpolation=BILINEAR, antialias=True)
        h, w = img.shape[-2:]
        img = F.crop(img, (h - s + 1) // 2, (w - s + 1) // 2, s, s)  # DALI's centre: offsets rounded half up
    elif policy.crop == "resize":
        img = F.resize(img, [s, s], interpolation=BILINEAR, antialias=True)
    if policy.flip and int(p["flip"]):
        img = F.horizontal_flip(img)
    if policy.vflip and int(p["vflip"]):
        img = F.vertical_flip(img)
    if policy.rotate > 0:
        img = F.rotate(img, float(p["angle"]), interpolation=BILINEAR, fill=0)
    return img


def jitter(img: torch.Tensor, factors: Sequence[float]) -> torch.Tensor:
    """Colour jitter in the fixed order brightness, contrast, saturation (torchvision draws a random order).

    Brightness b and contrast c about the grey mean m of the input (ITU-R 601 luma, as PIL) in one step,
    ``b * (m + c * (x - m))``, rounded and clamped once, as DALI's ``fn.brightness_contrast`` does (torchvision
    clamps after the brightness step too, which only matters for pixels that saturate)."""
    b, c, s = (float(v) for v in factors)
    x = img.to(torch.float32)
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(3, 1, 1)
    m = (x * weights).sum(0).mean()
    y = (b * (m + c * (x - m))).round().clamp(0, 255).to(torch.uint8)
    return F.adjust_saturation(y, s)


def apply_op(img: torch.Tensor, name: str, mag: float) -> torch.Tensor:
    """One automatic-augmentation op on a uint8 CHW image, magnitudes in :mod:`hpckd.data.autoaug` units."""
    h, w = img.shape[-2:]
    if name == "identity":
        return img
    if name in ("shear_x", "shear_y"):
        # torchvision's shear angle runs opposite to DALI's shear factor; follow DALI (the sign is random anyway)
        angle = -math.degrees(math.atan(mag))
        shear = [angle, 0.0] if name == "shear_x" else [0.0, angle]
        return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=BILINEAR, fill=0,
                        center=[0.0, 0.0])
    if name in ("translate_x", "translate_y"):  # sub-pixel shifts, bilinear, like DALI's warp_affine
        shift = [mag * w, 0.0] if name == "translate_x" else [0.0, mag * h]
        return F.affine(img, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=BILINEAR, fill=0)
    if name == "rotate":
        return F.rotate(img, mag, interpolation=BILINEAR, fill=0)
    if name == "brightness":
        return F.adjust_brightness(img, 1.0 + mag)
    if name == "color":
        return F.adjust_saturation(img, 1.0 + mag)
    if name == "contrast":
        return F.adjust_contrast(img, 1.0 + mag)
    if name == "sharpness":
        return F.adjust_sharpness(img, 1.0 + mag)
    if name == "posterize":
        return F.posterize(img, int(min(8, max(1, round(mag)))))
    if name == "solarize":
        return F.solarize(img, mag)
    if name == "auto_contrast":
        return F.autocontrast(img)
    if name == "equalize":
        return equalize(img)
    if name == "invert":
        return F.invert(img)
    raise ValueError(f"unknown augmentation op {name!r}")


def equalize(img: torch.Tensor) -> torch.Tensor:
    """Per-channel histogram equalisation with OpenCV's lookup table (what DALI's ``fn.equalize`` computes;
    torchvision follows PIL, whose table differs by a few levels): for the first non-empty bin i0,
    ``lut[j] = round((cdf[j] - hist[i0]) * 255 / (N - hist[i0]))``; a one-colour channel is left as it is."""
    out = torch.empty_like(img)
    for c in range(img.shape[0]):
        values = img[c].reshape(-1).long()
        hist = torch.bincount(values, minlength=256)
        first = int(torch.nonzero(hist)[0])
        total = values.numel()
        if int(hist[first]) == total:
            out[c] = img[c]
            continue
        cdf = torch.cumsum(hist, 0)
        lut = torch.round((cdf - hist[first]).double() * 255.0 / (total - int(hist[first]))).clamp(0, 255)
        out[c] = lut.to(torch.uint8)[values].view(img.shape[1:])
    return out


def auto_program(img: torch.Tensor, policy: Policy, p: Mapping[str, np.ndarray]) -> torch.Tensor:
    suite = autoaug.suite_of(policy.auto)
    for op_id, bin_, sign in zip(p["ops"], p["mags"], p["signs"]):
        op = suite.ops[int(op_id)]
        img = apply_op(img, op.name, op.magnitude(int(bin_), suite.bins, bool(sign)))
    return img


def cutout(img: torch.Tensor, top_left: Sequence[float], side: int) -> torch.Tensor:
    """Zero a side x side square whose top-left corner is ``top_left`` (clipped to the image)."""
    h, w = img.shape[-2:]
    y0, x0 = int(top_left[0]), int(top_left[1])
    y1, x1 = max(0, min(h, y0 + side)), max(0, min(w, x0 + side))
    img = img.clone()
    img[..., max(0, y0):y1, max(0, x0):x1] = 0
    return img


def normalize(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 CHW -> float32 (x / 255 - mean) / std."""
    x = img.to(torch.float32) / 255.0
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (x - m) / s


def render(img: torch.Tensor, policy: Policy, p: Mapping[str, np.ndarray], mean: Sequence[float],
           std: Sequence[float]) -> torch.Tensor:
    """The view ``policy`` with parameters ``p`` of one decoded uint8 CHW image, normalised float CHW (parts in
    the order of :mod:`hpckd.data.aug`)."""
    img = geometry(img, policy, p)
    if policy.has_jitter:
        img = jitter(img, p["jitter"])
    if policy.hue > 0:
        img = F.adjust_hue(img, float(p["hue"]))
    if policy.grayscale > 0 and float(p["gray"]) == 0.0:
        img = F.rgb_to_grayscale(img, num_output_channels=3)  # torchvision's RandomGrayscale
    if policy.auto:
        img = auto_program(img, policy, p)
    if policy.cutout > 0:
        img = cutout(img, p["erase"], policy.cutout)
    return normalize(img, mean, std)


def row(params: Mapping[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """The parameters of sample ``i`` of a batch of parameters."""
    return {k: v[i] for k, v in params.items()}
