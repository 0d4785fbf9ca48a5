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
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

if TYPE_CHECKING:  # only an annotation here: the helpers stay light to import
    from hpckd.teachers import TeacherSet

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


# ------------------------------------------------------------------ reliability helpers (real processes, real files)


def tiny_run_args(data_root: Path, out_dir: Path, *extra: str) -> list[str]:
    """Overrides of a run that takes a few seconds: resnet8, the torch loader, one worker, batch 8."""
    return [f"data.root={data_root}", f"out_dir={out_dir}", "model.arch=resnet8", "data.loader=torch",
            "data.num_workers=1", "data.batch_size=8", "data.eval_batch_size=4", "optim.epochs=1", *extra]


def make_undecodable(jpeg: Path) -> None:
    """Rewrite a JPEG in place so that its header, markers and end-of-image marker stay valid (hpckd's index-time
    check passes it) but decoding fails: the start-of-scan segment names a component the frame does not have."""
    data = jpeg.read_bytes()
    sos = data.index(b"\xff\xda")
    with open(jpeg, "r+b") as handle:  # in place: the folder's mtime stays, as with an edit by another tool
        handle.seek(sos + 4)
        handle.write(bytes([9]))


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, poll_s: float = 0.05):
    """Poll ``predicate()`` until it returns something truthy (a file appeared, a log line was written) and return
    it; fail after ``timeout`` seconds, or as soon as ``proc`` exits, naming ``what`` was awaited."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process exited ({proc.returncode}) while waiting for {what}: {out}{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll_s)


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes (not zombies) whose command line contains ``text`` (Linux ``/proc``)."""
    import os

    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def log_events(log: Path, event: str) -> list[dict]:
    """The records of one event type in a run's ``log.jsonl`` (an empty list while it does not exist)."""
    import json

    if not log.is_file():
        return []
    records = []
    for line in log.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # the line being written right now
    return [r for r in records if r.get("event") == event]


def run_in_tmpfs(mount: Path, command: list[str], *, size: str = "1m", read_only: bool = False,
                 env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``command`` in a private mount namespace (``unshare``: no root needed where user namespaces are
    allowed) where ``mount`` is a fresh tmpfs of ``size`` -- full after ``size`` bytes, or read-only: the real
    ENOSPC and EROFS of a full or read-only disk. The mount vanishes with the command. The shell then lists what
    is left on the mount (``ls -A``) on a last stdout line ``LEFT: ...``."""
    import os
    import subprocess

    mount.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    script = ('mount -t tmpfs -o "$1" tmpfs "$2" || exit 97; shift 2; "$@"; rc=$?; '
              'echo "LEFT: $(ls -A "$OLDPWD_MOUNT" | tr "\\n" " ")"; exit $rc')
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "OLDPWD_MOUNT": str(mount), **(env or {})}
    proc = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script, "sh", options, str(mount),
                           *command], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if proc.returncode == 97:
        pytest.fail(f"cannot mount a tmpfs in a user namespace here (unshare -rm): {proc.stderr}")
    return proc


# ------------------------------------------------------------------------------------------------ SLURM


def require_cluster(test_file: str) -> Path:
    """The running local cluster's state folder (``slurm/with_cluster.sh`` sets HPCKD_SLURM_STATE); fails the calling
    test (never skips it) when there is none, naming the command that runs ``test_file`` with a cluster."""
    state = os.environ.get("HPCKD_SLURM_STATE")
    if not state:
        pytest.fail(f"{test_file} needs a live SLURM cluster: run it via `bash slurm/with_cluster.sh "
                    f".venv/bin/python -m pytest {test_file}` (HPCKD_SLURM_STATE is unset)")
    conf = Path(state) / "etc" / "slurm.conf"
    if not conf.is_file():
        pytest.fail(f"HPCKD_SLURM_STATE={state} holds no etc/slurm.conf; start the cluster with slurm/with_cluster.sh")
    os.environ.setdefault("SLURM_CONF", str(conf))
    return Path(state)


class TwoPassTeachers:
    """The same teachers without the one-pass capability (``logits_and_maps``): logits from a call, CAM features
    and attention maps each from a second pass; the evaluation tests compare the one-pass metrics with these."""

    def __init__(self, teachers: TeacherSet) -> None:
        self.inner = teachers
        self.num_classes = teachers.num_classes
        self.precision = teachers.precision

    def __len__(self) -> int:
        return len(self.inner)

    def __call__(self, batch):
        return self.inner(batch)

    def check_num_classes(self, num_classes: int) -> None:
        self.inner.check_num_classes(num_classes)

    @property
    def metas(self):
        return self.inner.metas

    def has_cam_features(self, index: int) -> bool:
        return self.inner.has_cam_features(index)

    def cam_features(self, batch, index: int):
        return self.inner.cam_features(batch, index)

    def has_attention_maps(self, index: int) -> bool:
        return self.inner.has_attention_maps(index)

    def attention_maps(self, batch, index: int):
        return self.inner.attention_maps(batch, index)
