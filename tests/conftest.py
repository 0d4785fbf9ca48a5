"""Shared fixtures: small generated data sets and the torch thread settings. Plain helper functions (running the
real `hpckd` command, numpy references, ...) live in ``tests/helpers.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpckd.data.synth import SynthSpec, write_imagefolder

# Re-exported for tests written against the older `from tests.conftest import run_hpckd`; new code imports them
# from tests.helpers.


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """4 classes x 48 train / 10 val images of 32x32 (session-wide, read-only for tests)."""
    root = tmp_path_factory.mktemp("synth")
    write_imagefolder(root, SynthSpec(classes=4, per_class=48, val_per_class=10, seed=0))
    return root


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny tensors on a loaded 2-core machine are much faster on one thread (no OpenMP hand-off)."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for this test, whatever an earlier test in the process set (an in-process demo job sets
    its own share), restored afterwards. Tiny tensors: more threads only add contention on a 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------ reliability helpers (real processes, real files)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """2 classes x 8 train / 2 val images of 32x32: the smallest set a run trains on (session-wide, read-only)."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    write_imagefolder(root, SynthSpec(classes=2, per_class=8, val_per_class=2, seed=0))
    return root


@pytest.fixture(scope="session")
def resume_data(tmp_path_factory) -> Path:
    """4 classes x 24 training / 6 val images of 32x32 (seed 1): the in-process runs of the training-loop tests
    (batch 16 -> 6 steps per epoch)."""
    root = tmp_path_factory.mktemp("resume_data")
    write_imagefolder(root, SynthSpec(classes=4, per_class=24, val_per_class=6, seed=1))
    return root


@pytest.fixture
def outside_slurm(monkeypatch):
    """A preempted run must never requeue whatever job this test suite itself might be running in."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
