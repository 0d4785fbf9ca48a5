"""Per-sample augmentation parameters of a view: drawn up front, recorded on the batch, replayable.

Every random choice a :class:`~hpckd.data.aug.Policy` makes is drawn here, in numpy, before any pixel is
touched, from counter-based uniforms keyed by ``(seed, epoch, view stream, sample id)`` (:mod:`hpckd.data.rand`).
The back ends (DALI graph, torch renderer) only *apply* the parameters. Consequences:

- a sample's view is a pure function of (seed, epoch, view name, sample id, image size): resume needs no RNG
  state, and the world size, batch size and worker count do not change what a sample looks like;
- the parameters travel with the batch (``batch.aug[view]``), so a logit store can record them, or recompute them
  from the key, and replay the exact view (:func:`hpckd.data.render_torch.render`).

Parameter arrays (only those the policy uses are present), B = batch size:

==========  ===========  =====================================================================================
key         shape/dtype  meaning
==========  ===========  =====================================================================================
``crop``    (B, 4) int32 ``rrc``: (top, left, height, width) window of the source image, resized to size x size;
                         ``pad_crop``: (top, left, size, size) window of the image resized to size x size,
                         top/left in [-pad, pad] (outside = zero padding)
``flip``    (B,) int32   1 = mirror horizontally
``angle``   (B,) float32 rotation in degrees, uniform in [-rotate, rotate]
``jitter``  (B, 3) f32   brightness, contrast, saturation factors, each uniform in [1 - j, 1 + j]
``ops``     (B, K) int32 automatic-augmentation program (:mod:`hpckd.data.autoaug`): op ids,
``mags``    (B, K) int32 magnitude bins,
``signs``   (B, K) int32 and signs (1 = negate a signed op)
``erase``   (B, 2) f32   Cutout: (top, left) of the erased square in output pixels (centre uniform over the
                         image, DeVries & Taylor 2017; the square may hang over the border and is clipped)
``vflip``   (B,) int32   1 = mirror vertically (p = 0.5, torchvision's RandomVerticalFlip)
``hue``     (B,) float32 hue shift in [-hue, hue] (fraction of the hue circle, torchvision's ``adjust_hue``)
``gray``    (B,) float32 saturation factor of RandomGrayscale: 0 (grey, with probability ``grayscale``) or 1
==========  ===========  =====================================================================================

The uniforms of the parts added later (vertical flip, hue, grayscale, RandAugment's sampled count and magnitudes)
take slots *after* the earlier ones, so a policy without them draws exactly what it drew before.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from hpckd.data import autoaug
from hpckd.data.aug import Policy
from hpckd.data.rand import uniforms

RRC_ATTEMPTS = 10
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Slot layout of one sample's uniforms; fixed offsets keep each field's draws independent of the others.
_CROP, _FLIP, _ANGLE, _JITTER, _ERASE, _AUTO = 0, 40, 41, 42, 45, 47


def stream_id(view: str) -> int:
    """Stable id of a view's random stream (crc32 of its name): adding a view never changes another one."""
    return zlib.crc32(view.encode())


def view_key(seed: int, epoch: int, view: str) -> tuple[int, int, int]:
    return (int(seed), int(epoch), stream_id(view))


def _auto_slots(policy: Policy) -> int:
    sample = policy.ra_sample_n or policy.ra_sample_m
    return autoaug.slots(policy.auto, policy.ra_n, sample) if policy.auto else 0


def n_slots(policy: Policy) -> int:
    """Uniform draws one sample's parameters take (the later parts' slots only when a part uses them, so that an
    earlier policy takes exactly as many draws as before, also from a stateful generator)."""
    later = policy.vflip or policy.hue > 0 or policy.grayscale > 0
    return _AUTO + _auto_slots(policy) + (_EXTRA if later else 0)


_VFLIP, _HUE, _GRAY, _EXTRA = 0, 1, 2, 3  # offsets after the automatic-augmentation slots


def sample_params(policy: Policy, key: tuple[int, ...], ids: np.ndarray, sizes: np.ndarray) -> dict[str, np.ndarray]:
    """Parameters of ``policy`` for samples ``ids`` whose source images are ``sizes`` (B, 2) = (height, width)."""
    return params_from_uniforms(policy, uniforms(key, np.asarray(ids, dtype=np.int64), n_slots(policy)), sizes)


def params_from_uniforms(policy: Policy, u: np.ndarray, sizes: np.ndarray) -> dict[str, np.ndarray]:
    """Parameters of ``policy`` from uniforms ``u`` (B, n_slots(policy)) in [0, 1)."""
    u = np.asarray(u, dtype=np.float64)
    ids = np.arange(len(u))
    sizes = np.broadcast_to(np.asarray(sizes, dtype=np.int64).reshape(-1, 2), (len(u), 2))
    n_auto = _auto_slots(policy)
    extra = _AUTO + n_auto
    out: dict[str, np.ndarray] = {}
    if policy.crop == "rrc":
        out["crop"] = rrc_windows(u[:, _CROP:_CROP + 4 * RRC_ATTEMPTS], sizes, policy.rrc_scale)
    elif policy.crop == "pad_crop":
        offsets = np.minimum((u[:, _CROP:_CROP + 2] * (2 * policy.pad + 1)).astype(np.int32), 2 * policy.pad) - policy.pad
        out["crop"] = np.concatenate([offsets, np.full((len(ids), 2), policy.size, np.int32)], axis=1).astype(np.int32)
    if policy.flip:
        out["flip"] = (u[:, _FLIP] < 0.5).astype(np.int32)
    if policy.rotate > 0:
        out["angle"] = ((2.0 * u[:, _ANGLE] - 1.0) * policy.rotate).astype(np.float32)
    if policy.vflip:
        out["vflip"] = (u[:, extra + _VFLIP] < 0.5).astype(np.int32)
    if policy.has_jitter:
        strength = np.asarray(policy.jitter_strengths, dtype=np.float64)
        lo, hi = np.maximum(0.0, 1.0 - strength), 1.0 + strength
        out["jitter"] = (lo + (hi - lo) * u[:, _JITTER:_JITTER + 3]).astype(np.float32)
    if policy.hue > 0:
        out["hue"] = ((2.0 * u[:, extra + _HUE] - 1.0) * policy.hue).astype(np.float32)
    if policy.grayscale > 0:
        out["gray"] = (u[:, extra + _GRAY] >= policy.grayscale).astype(np.float32)
    if policy.auto:
        out.update(autoaug.draw_program(policy.auto, u[:, _AUTO:_AUTO + n_auto], policy.ra_n, policy.ra_m,
                                        policy.ra_sample_n, policy.ra_sample_m, policy.ra_n_min))
    if policy.cutout > 0:
        centre = np.floor(u[:, _ERASE:_ERASE + 2] * policy.size)
        out["erase"] = (centre - policy.cutout // 2).astype(np.float32)
    return out


def rrc_windows(u: np.ndarray, sizes: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """RandomResizedCrop windows (Szegedy et al. 2015, torchvision's algorithm), vectorised over the batch.

    Up to 10 attempts draw an area fraction in ``scale`` and a log-uniform aspect ratio in [3/4, 4/3]; the first
    window that fits is placed uniformly. If none fits, the whole image is cropped centrally to the nearest
    allowed aspect ratio. ``u``: (B, 40) uniforms; returns (B, 4) int32 (top, left, height, width)."""
    b = len(sizes)
    h_img, w_img = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    area = h_img * w_img
    out = np.zeros((b, 4), dtype=np.int64)
    done = np.zeros(b, dtype=bool)
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    for attempt in range(RRC_ATTEMPTS):
        ua, ur, ui, uj = (u[:, 4 * attempt + k] for k in range(4))
        target = area * (scale[0] + (scale[1] - scale[0]) * ua)
        ratio = np.exp(log_lo + (log_hi - log_lo) * ur)
        w = np.round(np.sqrt(target * ratio))
        h = np.round(np.sqrt(target / ratio))
        fits = ~done & (w > 0) & (h > 0) & (w <= w_img) & (h <= h_img)
        top = np.floor(ui * (h_img - h + 1))
        left = np.floor(uj * (w_img - w + 1))
        out[fits] = np.stack([top, left, h, w], axis=1)[fits]
        done |= fits
    if not done.all():
        rest = ~done
        in_ratio = w_img / h_img
        w = np.where(in_ratio < RRC_RATIO[0], w_img, np.where(in_ratio > RRC_RATIO[1], np.round(h_img * RRC_RATIO[1]), w_img))
        h = np.where(in_ratio < RRC_RATIO[0], np.round(w_img / RRC_RATIO[0]), h_img)
        top, left = (h_img - h) // 2, (w_img - w) // 2
        out[rest] = np.stack([top, left, h, w], axis=1)[rest]
    return out.astype(np.int32)
