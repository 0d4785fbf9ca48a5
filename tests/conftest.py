"""Shared fixtures: small generated data sets and a helper that runs the real `hpckd` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpckd.data.synth import SynthSpec, write_imagefolder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """4 classes x 48 train / 10 val images of 32x32 (session-wide, read-only for tests)."""
    root = tmp_path_factory.mktemp("synth")
    write_imagefolder(root, SynthSpec(classes=4, per_class=48, val_per_class=10, seed=0))
    return root


def run_hpckd(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m hpckd ARGS` in a fresh process, as a user would."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "hpckd", *args], cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """A user error: non-zero exit, exactly one stderr line starting 'hpckd: error:', no traceback."""
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("hpckd: error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny tensors on a loaded 2-core machine are much faster on one thread (no OpenMP hand-off)."""
    import torch

    torch.set_num_threads(1)
    yield
