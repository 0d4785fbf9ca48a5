"""Initialisation on the line between a random initialisation and a teacher (fidelity study, Sec. 5, Fig. 6b).

    theta_s = lambda * theta_t + (1 - lambda) * theta_r

theta_t are the weights of a teacher of the student's architecture, theta_r the student's own random
initialisation (drawn from the run's seed), lambda in [0, 1]: 0 is an ordinary random start, 1 starts at the teacher.
Every floating-point parameter and buffer is interpolated (BatchNorm running statistics included); integer buffers
(BatchNorm's ``num_batches_tracked``) come from the teacher.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from hpckd.errors import ConfigError
from hpckd.models.hooks import unwrap
from hpckd.models.weights import load_weights


def interpolate_states(teacher: dict[str, torch.Tensor], random: dict[str, torch.Tensor],
                       lam: float) -> dict[str, torch.Tensor]:
    """``lam * teacher + (1 - lam) * random`` for every floating-point entry (fidelity study Fig. 6b); integer
    entries from ``teacher``. Both dicts must have the same keys and shapes."""
    if not 0.0 <= lam <= 1.0:
        raise ConfigError(f"config: 'model.init_lambda' is {lam}; interpolate with a lambda in [0, 1]")
    out = {}
    for key, t in teacher.items():
        r = random[key]
        out[key] = torch.lerp(r, t.to(r.dtype), lam) if r.is_floating_point() else t.clone()
    return out


def init_from_teacher(model: nn.Module, path: str | os.PathLike, lam: float) -> nn.Module:
    """Move ``model`` (freshly, randomly initialised) to ``lam * theta_t + (1 - lam) * theta_r`` with theta_t read
    from the checkpoint at ``path`` (same architecture, checked with one line naming what does not fit)."""
    target = unwrap(model)
    random = {k: v.detach().clone() for k, v in target.state_dict().items()}
    load_weights(target, path)
    teacher = {k: v.detach().clone() for k, v in target.state_dict().items()}
    target.load_state_dict(interpolate_states(teacher, random, float(lam)))
    return model
