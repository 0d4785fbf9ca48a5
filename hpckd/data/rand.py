"""Counter-based random numbers: every draw is a pure function of (key, sample id, slot).

Loaders draw each sample's augmentation parameters from here instead of from a stateful generator, so a
sample's parameters do not depend on the batch it lands in, the worker or rank that processes it, or the samples
before it. That makes resume exact (no state to restore) and lets a logit store recompute any view later.

The mixer is SplitMix64's finaliser (Steele, Lea & Flood, "Fast splittable pseudorandom number generators",
OOPSLA 2014) applied to ``base(key) + id * golden + slot * c2``; its output passes BigCrush, far beyond what
augmentation sampling needs, and it vectorises in numpy (one pass over a (B, slots) uint64 array).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SLOT = np.uint64(0xD1B54A32D192ED03)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@lru_cache(maxsize=4096)
def key_base(key: tuple[int, ...]) -> int:
    """64-bit stream base of a key such as (seed, epoch, view): SeedSequence hashing keeps keys apart."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in key]).generate_state(1, np.uint64)[0])


def _mix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def uniforms(key: tuple[int, ...], ids: np.ndarray, slots: int) -> np.ndarray:
    """(len(ids), slots) float64 in [0, 1): slot j of sample i under ``key``; independent across all three."""
    ids = np.asarray(ids, dtype=np.uint64).reshape(-1, 1)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        x = np.uint64(key_base(tuple(key))) + ids * _GOLDEN + np.arange(slots, dtype=np.uint64)[None, :] * _SLOT
        bits = _mix(_mix(x))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
