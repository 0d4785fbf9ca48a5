"""The GPU session kit (benchmarks/gpu/checks.py) in its CPU mode, so it stays in step with the code between the rare
sessions that get a GPU machine: every check of the quick CPU set must pass."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.dist]  # spawns training runs, torchrun and DeepSpeed ranks


def test_the_gpu_kit_passes_every_check_that_runs_on_a_cpu(tmp_path):
    out = tmp_path / "cpu_checks.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu/checks.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    checks = json.loads(out.read_text())["checks"]
    ran = [c for c in checks if c["status"] != "not_run"]
    assert len(ran) >= 16, [c["name"] for c in ran]  # the quick CPU set: env, configs, serving, DDP, DeepSpeed, DALI
    assert all(c["status"] == "pass" for c in ran), [(c["name"], c["status"]) for c in ran if c["status"] != "pass"]
