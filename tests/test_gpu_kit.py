"""The GPU session kit (benchmarks/gpu/checks.py) in its CPU mode, so it stays in step with the code between the rare
sessions that get a GPU machine: every check of the quick CPU set must pass."""

from __future__ import annotations

import json
import os
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


def test_the_kits_bench_step_runs_hpckd_bench_and_returns_its_files(tmp_path):
    """run.sh's `bench SUITE` step (CPU, tiny here; full on the device) runs `hpckd bench` and copies its files to $OUT."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "HPCKD_WORK": str(work), "PYTHON": sys.executable, "BENCH_SIZE": "tiny",
           "BENCH_DEVICE": "cpu", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks/gpu/run.sh"), "bench", "overhead"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "bench_overhead.json").read_text())
    assert report["size"] == "tiny" and list(report["suites"]) == ["overhead"]
    assert {r["name"] for r in report["suites"]["overhead"]["rows"]} == {"bare PyTorch loop", "hpckd engine"}
    assert "## overhead" in (out / "bench_overhead.md").read_text()
    assert (work / "bench" / "work" / "data").is_dir()  # --work: the suites' data shared between suites
