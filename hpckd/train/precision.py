"""Mixed precision: which autocast dtype, and a gradient scaler for fp16.

Parameters, optimizer state and the loss stay fp32 in every mode; only the forward passes (student and inline
teachers) run under ``torch.autocast``. Logits are cast back to fp32 before the loss, because KD losses divide by
a temperature and exponentiate (a bf16 softmax at tau = 4 loses most of the mantissa the soft targets live in).
fp16 needs loss scaling (Micikevicius et al. 2018, "Mixed Precision Training", Sec. 3.2) against gradient underflow;
bf16 has fp32's exponent range and does not.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` (None = plain fp32)."""
    return DTYPES[precision]


def autocast(precision: str, device: torch.device) -> ContextManager:
    """``torch.autocast`` for the forward pass, or a no-op context for fp32."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16, else None (bf16 and fp32 need none)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)
