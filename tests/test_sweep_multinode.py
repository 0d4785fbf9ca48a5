"""A multi-node sweep trial on a real two-node SLURM cluster: `stages.students.nodes: 2` makes the trial one array
task whose two tasks, one per node, form one DDP (gloo) job, initialised by ``hpckd.dist.init`` from submitit's
environment.

The two nodes are two ``slurmd -N NAME`` daemons on this machine, one port each, under one controller
(``HPCKD_SLURM_NODES=2 slurm/local_cluster.sh``; Debian's SLURM 22.05 accepts it). When the cluster of
``slurm/with_cluster.sh`` has a single node, the test stands up a private two-node cluster of its own (root and the
SLURM packages are there: the cluster tests need them anyway) and stops it afterwards::

    bash slurm/with_cluster.sh .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_sweep_multinode.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, require_cluster, run_hpckd

pytestmark = [pytest.mark.slurm, pytest.mark.dist]

BOUND_S = 600.0


def node_count(env: dict[str, str]) -> int:
    out = subprocess.run(["sinfo", "-h", "-o", "%D"], capture_output=True, text=True, check=True, env=env).stdout
    return sum(int(n) for n in out.split())


@pytest.fixture
def two_nodes():
    """The environment (SLURM_CONF) of a cluster with at least two nodes: the running one, or a private one."""
    require_cluster("tests/test_sweep_multinode.py")
    if node_count(dict(os.environ)) >= 2:
        yield dict(os.environ)
        return
    # A short path: munged's socket lives under it (unix socket paths are limited to 108 bytes).
    state = Path(tempfile.mkdtemp(prefix="hpckd-2n.", dir="/tmp"))
    script = str(REPO / "slurm" / "local_cluster.sh")
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    start = subprocess.run(["bash", script, "start", str(state)], env={**env, "HPCKD_SLURM_NODES": "2"},
                           capture_output=True, text=True, timeout=300)
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        yield {**env, "SLURM_CONF": str(state / "etc" / "slurm.conf")}
    finally:
        stop = subprocess.run(["bash", script, "stop", str(state)], capture_output=True, text=True, timeout=300)
        if stop.returncode == 0:
            shutil.rmtree(state, ignore_errors=True)


def test_a_two_node_trial_is_one_ddp_job_across_both_nodes_and_evaluates_like_one_rank(tmp_path, two_nodes):
    assert node_count(two_nodes) >= 2
    stage = {"cpus_per_task": 1, "time_min": 10}
    config = {
        "name": "multinode", "out_dir": str(tmp_path / "sweep"), "report": False, "evaluate": ["val_augmented"],
        "base": {"model": {"arch": "resnet8"}, "log_every": 1,
                 "data": {"loader": "torch", "num_workers": 0, "batch_size": 8, "eval_batch_size": 8},
                 "optim": {"epochs": 2, "lr": 0.05}},
        "datasets": {"tiny": {"overrides": ["data.root={sweep}/data/tiny"],
                              "synth": {"classes": 4, "per_class": 16, "val_per_class": 4, "seed": 0}}},
        "trials": [{"name": "M"}],
        # The two local nodes are names for 127.0.0.1 (NodeAddr) that the resolver does not know: the rendezvous
        # address is given as a real cluster's job script would (a cluster's node names resolve; this line is
        # then not needed).
        "stages": {"data": stage, "evaluation": stage,
                   "students": {**stage, "nodes": 2, "tasks_per_node": 1, "setup": ["export MASTER_ADDR=127.0.0.1"]}},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    root = tmp_path / "sweep"
    proc = run_hpckd("sweep", "run", str(path), "--executor", "slurm", "--wait", "--poll", "1", env=two_nodes,
                     timeout=BOUND_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    record = json.loads((root / "trials" / "M" / "sweep-students.job.json").read_text())
    submission = (root / "submitit" / "students" / f"{record['array_id']}_submission.sh").read_text()
    assert "#SBATCH --nodes=2" in submission and "#SBATCH --ntasks-per-node=1" in submission, submission
    accounting = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State,NNodes,NodeList", "-j", record["job_id"]],
                                capture_output=True, text=True, check=True, env=two_nodes).stdout.split()
    state, nnodes, nodelist = accounting[0].split("|")
    assert (state, nnodes) == ("COMPLETED", "2"), accounting
    # Each task's submitit log names its node: task 0 on node 0 of 2, task 1 on node 1 of 2.
    task_logs = sorted((root / "submitit" / "students").glob(f"{record['job_id']}_*_log.out"))
    seen = sorted(m.group(1) for log in task_logs
                  for m in [re.search(r"node=(\d+\(\d+\)), global_rank=", log.read_text())] if m)
    assert seen == ["0(2)", "1(2)"], (nodelist, [p.name for p in task_logs])

    results = json.loads((root / "trials" / "M" / "results.json").read_text())
    assert (results["launcher"], results["world_size"]) == ("submitit", 2), results.get("launcher")
    assert results["steps"] == 2 * 64 // 8  # the global batch is 8: each of the 2 ranks takes 4 (64 images, 2 epochs)
    # The evaluation stage is one process on one node (a separate job): the same checkpoint on the same val set
    # gives exactly the metrics that the two ranks on two nodes computed together at the end of training.
    assert {"val", "val_augmented", "val_affinity"} <= set(results["eval"]), results.get("eval")
    for key in ("accuracy", "nll", "count"):
        assert results["eval"]["val"][key] == pytest.approx(results["metrics"][key], abs=1e-12), key
