"""``hpckd.dist.init()`` behind each launcher script: torchrun, srun (local SLURM cluster) and mpirun; plus the
pure rules for rank variables, the rendezvous host and the CUDA device under SLURM.

The srun test needs the live cluster of ``slurm/with_cluster.sh`` and fails (never skips) without it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpckd import dist
from hpckd.errors import UserError
from tests.helpers import REPO

LAUNCHERS = REPO / "launchers"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's rank variables, the venv's python first on PATH."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_", "SLURM_", "OMPI_", "PMI", "SUBMITIT_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    if "SLURM_CONF" in os.environ:
        env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = sys.executable
    return {**env, **extra}


def dist_check(cmd: list[str], env: dict[str, str]) -> list[tuple[str, ...]]:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Whole lines: rank 0 prints every rank's report, so no two records can share a line.
    lines = re.findall(r"^rank (\d)/(\d) launcher=(\w+) local_rank=(\d) device=(\S+) all_reduce=([\d.]+) expected=([\d.]+)$",
                       proc.stdout, re.MULTILINE)
    assert sorted(line[0] for line in lines) == ["0", "1"], proc.stdout + proc.stderr
    return lines


def assert_two_ranks(lines, launcher: str) -> None:
    for _rank, world, got_launcher, local_rank, device, got, expected in lines:
        assert (world, got_launcher, device) == ("2", launcher, "cpu")
        assert float(got) == float(expected) == 3.0  # (0 + 1) + (1 + 1)
    assert sorted(line[3] for line in lines) == ["0", "1"]  # both on one node: local ranks 0 and 1


@pytest.mark.dist
def test_torchrun_launcher_two_ranks():
    assert_two_ranks(dist_check([str(LAUNCHERS / "torchrun.sh"), "dist-check", "--cpu"], clean_env(NPROC="2")), "torchrun")


@pytest.mark.dist
def test_mpirun_launcher_two_ranks():
    env = clean_env(NP="2", MPIRUN_ARGS="--oversubscribe")
    assert_two_ranks(dist_check([str(LAUNCHERS / "mpirun.sh"), "dist-check", "--cpu"], env), "mpirun")


@pytest.mark.slurm
@pytest.mark.dist
def test_srun_launcher_two_tasks_on_the_local_cluster():
    if not os.environ.get("HPCKD_SLURM_STATE"):
        pytest.fail("needs a live SLURM cluster: run via `bash slurm/with_cluster.sh .venv/bin/python -m pytest "
                    "tests/test_dist_launch.py` (HPCKD_SLURM_STATE is unset)")
    os.environ.setdefault("SLURM_CONF", str(Path(os.environ["HPCKD_SLURM_STATE"]) / "etc" / "slurm.conf"))
    # srun reads its task count from SLURM_NTASKS, the way `srun -n 2` inside an allocation would get it.
    env = clean_env(SLURM_NTASKS="2", SLURM_CONF=os.environ["SLURM_CONF"])
    assert_two_ranks(dist_check([str(LAUNCHERS / "srun.sh"), "dist-check", "--cpu"], env), "srun")


def test_srun_variables_and_rendezvous_host(monkeypatch):
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert dist.detect_launcher(env) == "srun"
    assert dist.detect_launcher({**env, "SLURM_NTASKS": "1"}) == "single"  # a one-task job is not distributed
    assert dist.detect_launcher({k: v for k, v in env.items() if k != "SLURM_STEP_ID"}) == "single"  # batch shell
    for key in [k for k in os.environ if k.startswith(("SLURM_", "MASTER_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the node list is parsed here
    rank, world, local_rank, local_world, addr, port = dist._ranks_from_env("srun")
    assert (rank, world, local_rank, local_world, addr) == (5, 8, 1, 4, "gpu07")
    assert port == 20000 + 4242  # derived from the job id: the same on every task without talking


def test_first_host_of_slurm_node_lists():
    assert dist.first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert dist.first_host("node3,node4") == "node3"
    assert dist.first_host("rack1-n[10-11]-ib") == "rack1-n10-ib"


def test_one_gpu_bound_per_task_is_cuda_0():
    assert dist.cuda_index(local_rank=3, visible_devices=1) == 0  # --gpus-per-task=1: the task's GPU is cuda:0
    assert dist.cuda_index(local_rank=3, visible_devices=4) == 3  # all GPUs visible: one per local rank
    with pytest.raises(UserError, match="only 2 CUDA devices"):
        dist.cuda_index(local_rank=3, visible_devices=2)
