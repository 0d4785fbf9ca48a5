"""`mpirun -np 2` launches an hpckd entry point that initialises torch.distributed from MPI and all-reduces."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.dist


def test_mpirun_two_ranks_all_reduce():
    mpirun = shutil.which("mpirun")
    assert mpirun, "OpenMPI's mpirun is not installed (make test installs openmpi-bin)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    proc = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "-m", "hpckd",
                           "dist-check", "--cpu"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Whole lines: rank 0 prints every rank's report, so no two records can share a line.
    lines = re.findall(r"^rank (\d)/(\d) launcher=(\w+) .* all_reduce=(\S+) expected=(\S+)$", proc.stdout, re.MULTILINE)
    assert sorted(line[0] for line in lines) == ["0", "1"], proc.stdout
    for _rank, world, launcher, got, expected in lines:
        assert world == "2" and launcher == "mpirun"
        assert float(got) == 3.0 == float(expected)  # (0 + 1) + (1 + 1)
