"""The suites' shared context and inputs: generated data sets, experiment configs, teacher checkpoints."""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from hpckd.data.synth import SynthSpec, write_imagefolder
from hpckd.io import atomic_write_text

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# The one data set every suite reads at size full (generated once; the GPU kit makes it ahead, see run.sh `data`).
FULL_DATA = dict(classes=16, per_class=128, height=375, width=500)


@dataclass
class Context:
    size: str  # tiny | small | full
    device: torch.device
    out_dir: Path
    work: Path

    def pick(self, table: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """This size's settings from a suite's ``{size: settings}`` table (``full`` on CPU stays ``full``)."""
        return dict(table[self.size])

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def dataset(ctx: Context, classes: int, per_class: int, height: int, width: int, val_per_class: int = 2) -> Path:
    """A generated ImageNet-like ImageFolder (``train/``, ``val/``) under the work folder, reused when present
    (a ``.complete`` marker is written last, so an interrupted generation is started over)."""
    root = ctx.work / "data" / f"{classes}x{per_class}_{height}x{width}_v{val_per_class}"
    if not (root / ".complete").exists():
        write_imagefolder(root, SynthSpec(classes=classes, per_class=per_class, val_per_class=val_per_class,
                                          height=height, width=width, seed=0))
        atomic_write_text(root / ".complete", "")
    return root


def has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def experiment(overrides: Sequence[str]):
    from hpckd.train.experiment import load_experiment

    return load_experiment(None, list(overrides))


def train_run(overrides: Sequence[str], mode: str, hooks: Sequence[Any] = ()) -> dict[str, Any]:
    """One run of the real training loop (:func:`hpckd.train.engine.run`)."""
    from hpckd.train.engine import run

    return run(experiment(overrides), mode=mode, hooks=list(hooks))


def teacher_checkpoint(ctx: Context, common: Sequence[str], arch: str, seed: int) -> Path:
    """A teacher trained for one epoch with ``hpckd train`` (reused when the work folder has it): the benches
    time teachers, not their accuracy."""
    out = ctx.work / "teachers" / f"{arch}_s{seed}_{hashlib.sha1(repr(list(common)).encode()).hexdigest()[:10]}"
    if not (out / "last.pt").exists():
        train_run([*common, f"out_dir={out}", f"model.arch={arch}", "optim.epochs=1", f"seed={seed}",
                   "resume=never"], "train")
    return out / "last.pt"


def common_overrides(root: Path, *, family: str, image_size: int, batch: int, workers: int, loader: str,
                     device: torch.device) -> list[str]:
    """Overrides every bench run shares: the data, no logging or attention metrics, a fresh run each time."""
    return [f"data.root={root}", f"data.family={family}", f"data.image_size={image_size}", f"data.batch_size={batch}",
            f"data.eval_batch_size={batch}", f"data.num_workers={workers}", f"data.loader={loader}", "log_every=0",
            "metrics.attention_iou=false", "resume=never", f"dist.device={device.type}"]
