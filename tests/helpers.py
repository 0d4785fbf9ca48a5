"""Plain helper functions the tests share (fixtures live in ``conftest.py``). Test modules import from here and
never from one another, so each test file can be read, moved or deleted on its own.

hpckd is imported inside the functions that need it: a module moved by a refactor then breaks only the tests
that use that helper, not every test that imports this file.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # written out here, not read from hpckd: the tests' own expectation
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------ the real command


def run_hpckd(*args: str, cwd: Path | None = None, timeout: float = 600,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m hpckd ARGS` in a fresh process, as a user would."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "hpckd", *args], cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """A user error: non-zero exit, exactly one stderr line starting 'hpckd: error:', no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("hpckd: error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------ the in-process training loop


def train_config(data_root: Path, out: Path, *extra: str):
    """The experiment config of the tiny in-process runs (resnet8, torch loader in this process, batch 16, 2
    epochs, a log record per step, every checkpoint kept); ``extra`` overrides go last."""
    from hpckd.train.experiment import load_experiment

    return load_experiment(None, [f"data.root={data_root}", f"out_dir={out}", "model.arch=resnet8", "data.loader=torch",
                                  "data.num_workers=0", "data.batch_size=16", "data.eval_batch_size=24",
                                  "optim.epochs=2", "optim.lr=0.05", "log_every=1", "train.keep_last=100", *extra])


# ------------------------------------------------------------------- checkpoints, evaluated outside hpckd's loop


def val_logits(checkpoint: Path, data_root: Path) -> np.ndarray:
    """float64 (N, C) logits of a checkpoint's model on ``data_root/val`` (files sorted), computed here rather than
    by hpckd's evaluation: the checkpoint file read with torch.load, the model built from its stored arch, the
    images (32x32 PNGs, the ``cifar`` family's eval size: no resize) normalised with the ImageNet mean/std by hand.
    """
    from PIL import Image

    from hpckd.models import create

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = create(state["arch"], state["num_classes"], **state.get("arch_kwargs", {}))
    model.load_state_dict(state["model"])
    model.eval()
    files = sorted(p for p in (Path(data_root) / "val").rglob("*") if p.is_file())
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0 for f in files])
    x = (pixels - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    with torch.no_grad():
        logits = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    return logits.double().numpy()


# ------------------------------------------------------------------------------------- batch-op inputs


def image_batch(n=8, h=16, w=20, seed=0, teacher_view=False):
    """Images of integer pixels (so pixel identities survive the uint8 round trip), normalised like a loader;
    labels ``arange(n) % 3``, sample ids from 100, epoch 2."""
    from hpckd.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255
    x = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    views = {"student": x}
    if teacher_view:
        views["teacher1"] = x.flip(-1).clone()
    return Batch(views=views, labels=torch.arange(n) % 3, index=torch.arange(n) + 100, epoch=2)


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------- numpy references of the losses (the papers' formulas)
# Written from the papers, not from hpckd code; tests/test_losses_ref.py pins them to values worked out by hand.


def rand_logits(n: int, c: int, seed: int, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g) * scale).to(dtype)


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def label_batch(labels, valid=None, epoch: int = 3, index=None):
    """A Batch that only a loss reads: labels, ids (from 100), epoch, validity; 2x2 zero images."""
    from hpckd.data.batch import Batch

    labels = torch.as_tensor(labels, dtype=torch.long)
    n = labels.numel()
    return Batch(
        views={"student": torch.zeros(n, 3, 2, 2)},
        labels=labels,
        index=torch.arange(100, 100 + n) if index is None else torch.as_tensor(index),
        epoch=epoch,
        valid=None if valid is None else torch.as_tensor(valid, dtype=torch.bool),
    )


def softmax(z, tau: float = 1.0) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / tau
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(z, tau: float = 1.0) -> np.ndarray:
    return np.log(softmax(z, tau))


def ce(zs, labels, eps: float = 0.0) -> np.ndarray:
    """Per-sample CE with label smoothing eps: target (1 - eps) onehot + eps / C."""
    zs = np.asarray(zs, dtype=np.float64)
    c = zs.shape[1]
    target = np.full_like(zs, eps / c)
    target[np.arange(len(labels)), labels] += 1.0 - eps
    return -(target * log_softmax(zs)).sum(axis=1)


def kd_ce(zs, zt, tau: float, tau_t: float | None = None) -> np.ndarray:
    """-tau^2 sum_c softmax(zt/tau_t) log softmax(zs/tau) (attention study Eq. 7)."""
    pt = softmax(zt, tau_t or tau)
    return -(tau**2) * (pt * log_softmax(zs, tau)).sum(axis=1)


def kd_kl(zs, zt, tau: float, tau_t: float | None = None) -> np.ndarray:
    pt = softmax(zt, tau_t or tau)
    return tau**2 * (pt * (np.log(pt) - log_softmax(zs, tau))).sum(axis=1)


def kd_probs(zs, target, tau: float) -> np.ndarray:
    return -(tau**2) * (np.asarray(target) * log_softmax(zs, tau)).sum(axis=1)


def entropy(z, tau: float = 1.0) -> np.ndarray:
    p = softmax(z, tau)
    return -(p * np.log(p)).sum(axis=1)


def zscore(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, ddof=1, keepdims=True) + 1e-7)


# -------------------------------------------------------------------------- numpy references of the metrics


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(z))


def np_mi_eq4(t: np.ndarray, s: np.ndarray, c: int) -> float:
    """Attention study Eq. 4 as a literal double sum over the empirical joint distribution."""
    n = len(t)
    total = 0.0
    for i in range(c):
        for j in range(c):
            p_ij = np.sum((t == i) & (s == j)) / n
            if p_ij > 0:
                total += p_ij * math.log(p_ij / ((np.sum(t == i) / n) * (np.sum(s == j) / n)))
    return total


def np_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int, weighted: bool = True) -> float:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.arange(n_bins + 1) / n_bins
    total, gaps = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.sum() == 0:
            continue
        gap = abs(correct[in_bin].mean() - conf[in_bin].mean())
        gaps.append(gap)
        total += in_bin.mean() * gap
    return total if weighted else float(np.mean(gaps))
