"""Checkpoints: one ``torch.save`` dict, written atomically, loaded with one clear error on failure.

A checkpoint is a dict with at least ``model`` (state dict), ``arch``, ``num_classes``, ``config`` (the
experiment config as a plain dict) and ``meta`` (aug policy, dataset fingerprint, val accuracy, epoch ...).
A teacher is simply a checkpoint written by ``hpckd train``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hpckd.errors import CheckpointError
from hpckd.io import atomic_save

REQUIRED_KEYS = ("model", "arch", "num_classes")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    atomic_save(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load an hpckd checkpoint; a missing, corrupt or foreign file is one :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated zip, pickle garbage, ...
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not an hpckd checkpoint (needs keys {', '.join(REQUIRED_KEYS)})")
    return state
