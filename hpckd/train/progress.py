"""Where a run stands (epoch, step, the epoch's partial sums, history, timings): saved in every checkpoint, so a
resume continues the same bookkeeping."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint so a resume continues the same bookkeeping."""

    epoch: int = 0  # current epoch (== optim.epochs when finished)
    step: int = 0  # optimizer steps taken in total
    epoch_step: int = 0  # optimizer steps taken in the current epoch
    micro: int = 0  # micro-batches trained on in the current epoch (for the epoch means)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # per loss term, over this epoch's micro-batches
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # of the last evaluation
    train_s: float = 0.0
    wall_s: float = 0.0  # wall time of the run up to the last checkpoint, over all sessions
    images: int = 0  # training images seen (global)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    # this epoch's counts from the training forward passes (rows, correct, agreeing with the teacher ensemble)
    train_counts: dict[str, torch.Tensor | int] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state["sums"] = {k: v.detach().cpu() for k, v in self.sums.items()}
        state["train_counts"] = {k: int(v) for k, v in self.train_counts.items()}
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> "Progress":
        loaded = cls(**{k: copy.deepcopy(v) for k, v in state.items()})
        loaded.sums = {k: v.to(device) for k, v in loaded.sums.items()}
        return loaded

    def add_terms(self, terms: dict[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.micro += 1

    def add_counts(self, counts: dict[str, torch.Tensor]) -> None:
        """Add one micro-step's counts (device tensors: no host sync until the epoch ends)."""
        for name, value in counts.items():
            self.train_counts[name] = self.train_counts[name] + value if name in self.train_counts else value

    def close_epoch(self) -> dict[str, float]:
        """Epoch means of the loss terms (one host sync per epoch), and reset for the next epoch."""
        means = {f"train_{k}": float(v) / max(self.micro, 1) for k, v in self.sums.items()}
        self.sums, self.micro, self.epoch_step, self.train_counts = {}, 0, 0, {}
        return means
