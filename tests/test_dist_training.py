"""Two-process training with both backends, and preemption of a real SLURM job.

* The same tiny job (resnet8, 4 classes, bf16 autocast, channels-last) runs under torchrun with 2 processes on
  DDP (gloo) and on DeepSpeed ZeRO-2 (CPU accelerator, gloo). Both must learn and report alike; with gradient
  clipping off and fp32 gradient reduction DeepSpeed computes exactly what DDP does (measured on this machine
  kind: identical parameters), so their histories and final weights are compared for equality.
* The DeepSpeed job runs again as a 2-task SLURM batch job on the local cluster; SLURM sends it SIGUSR2 while it
  trains. It must write a checkpoint at the next step, requeue itself, resume on its own when SLURM restarts it,
  and finish with exactly the uninterrupted run's result. That job's tasks also show ``hpckd.dist.init()`` under
  ``srun -n 2``.
* A submitit job (:class:`hpckd.train.job.TrainJob`, ``Checkpointable``) gets the same signal: the loop
  checkpoints at the step boundary and hands over to submitit's handler, which requeues it; the requeued job
  resumes and returns the uninterrupted run's result.

The SLURM test needs the live cluster of ``slurm/with_cluster.sh`` and fails (never skips) without it. This file is
also the job's entry point (see the bottom): it arranges the preemption signal, then runs the ``hpckd`` command.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import torch

from hpckd.train.experiment import load_experiment
from hpckd.sweep.executor import make_executor
from hpckd.train import engine
from hpckd.checkpoint import CheckpointStore, load_checkpoint
from hpckd.train.job import TrainJob
from tests.helpers import REPO, require_cluster, run_hpckd

# submitit jobs unpickle PreemptingTrainJob below; ship this module by value so they need not import it.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # two-process training runs (torchrun, srun)
JOB_TIMEOUT_S = 420.0  # bound on the whole SLURM job (two runs and a requeue) on a loaded 2-core machine
POLL_S = 0.5
EPOCHS, STEPS_PER_EPOCH = 3, 12  # 192 training images / global batch 16


def job_args(data_root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", f"data.root={data_root}", f"out_dir={out}", "model.arch=resnet8", "aug=none", "data.loader=torch",
            "data.num_workers=0", "data.batch_size=16", "data.eval_batch_size=20", f"optim.epochs={EPOCHS}",
            "optim.lr=0.02", "log_every=4", "train.precision=bf16", "train.channels_last=true", *extra]


def ds_args() -> tuple[str, ...]:
    return ("dist.backend=deepspeed", "dist.zero_stage=2")


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def run_two_processes(data_root: Path, out: Path, *extra: str) -> dict:
    proc = run_hpckd(*job_args(data_root, out, "dist.nproc_per_node=2", *extra), env={"DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def ddp_run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    # foreach SGD, the kernel DeepSpeed's step runs (it is never fused), so the two can agree bit for bit below.
    return out, run_two_processes(synth_root, out, "optim.fused=false")


@pytest.fixture(scope="module")
def ds_run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    return out, run_two_processes(synth_root, out, *ds_args(), "train.checkpoint_every=8")


def assert_same_training(a: tuple[Path, dict], b: tuple[Path, dict]) -> None:
    (out_a, res_a), (out_b, res_b) = a, b
    assert res_a["history"] == res_b["history"] and res_a["metrics"] == res_b["metrics"]
    wa, wb = load_checkpoint(out_a / "last.pt")["model"], load_checkpoint(out_b / "last.pt")["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_ddp_and_deepspeed_learn_the_same_job_and_report_alike(ddp_run, ds_run):
    (ddp_out, ddp), (ds_out, ds) = ddp_run, ds_run
    for res, backend in ((ddp, "ddp"), (ds, "deepspeed")):
        assert (res["backend"], res["world_size"], res["launcher"], res["precision"]) == (backend, 2, "torchrun", "bf16")
        assert res["steps"] == EPOCHS * STEPS_PER_EPOCH
        first, last = res["history"][0]["train_loss"], res["history"][-1]["train_loss"]
        assert last < 0.8 * first, (first, last)  # learning: the training loss falls clearly
        assert res["metrics"]["accuracy"] >= 0.5 and res["metrics"]["count"] == 40  # chance is 0.25
    # One results file, one log format, whatever the backend.
    assert ddp.keys() == ds.keys() and ddp["timings"].keys() == ds["timings"].keys()
    ddp_log, ds_log = read_log(ddp_out), read_log(ds_out)
    assert {r["event"] for r in ddp_log} == {"start", "step", "epoch", "checkpoint", "end"}
    assert {r["event"] for r in ds_log} == {r["event"] for r in ddp_log}
    step_keys = {"step", "epoch", "lr", "loss", "ce", "images_per_s", "gpu_mem_gib", "max_rss_gib"}
    for log in (ddp_log, ds_log):
        steps = [r for r in log if r["event"] == "step"]
        assert [r["step"] for r in steps] == list(range(4, EPOCHS * STEPS_PER_EPOCH + 1, 4))
        assert all(step_keys <= r.keys() and r["images_per_s"] > 0 for r in steps)
    # Same arithmetic: ZeRO-2 with clipping off and fp32 gradient reduction is DDP, bit for bit.
    assert_same_training(ddp_run, ds_run)


def test_deepspeed_checkpoint_folder_is_complete_and_loadable(ds_run):
    out, _ = ds_run
    store = CheckpointStore(out / "checkpoints")
    entries = store.entries()
    assert [e.step for e in entries] == [32, 36]  # keep_last=2: the step-32 save and the final epoch's
    folder = entries[-1].path
    names = {p.name for p in folder.iterdir()}
    assert {"hpckd_state.pt", "mp_rank_00_model_states.pt"} <= names
    assert sum("optim_states" in n for n in names) == 2  # one ZeRO optimizer partition per rank
    state = load_checkpoint(folder)  # our API on DeepSpeed's layout
    assert state["backend"] == "deepspeed" and state["world_size"] == 2 and len(state["rng"]) == 2
    final = load_checkpoint(out / "last.pt")["model"]
    assert all(torch.equal(state["model"][k], final[k]) for k in final)


# ------------------------------------------------------------------------------------------------ SLURM


def job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def wait_for(job_id: str, done, what: str, deadline: float) -> dict[str, str]:
    """Bounded poll of the job's record until ``done(fields)``."""
    while True:
        fields = job_fields(job_id)
        if done(fields):
            return fields
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id}: {what} did not happen within the bound (state {fields.get('JobState')}, "
                        f"restarts {fields.get('Restarts')}, reason {fields.get('Reason')})")
        time.sleep(POLL_S)


def wait_for_requeue_and_end(job_id: str, output: Path) -> dict[str, str]:
    """Wait for the job to be requeued, release SLURM's hold on it, and wait for the requeued run to end."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    finished = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    requeued = lambda f: int(f.get("Restarts", 0)) >= 1 and f["JobState"] != "COMPLETING"  # noqa: E731
    first = wait_for(job_id, lambda f: requeued(f) or f["JobState"] in finished, "the requeue", deadline)
    tail = output.read_text()[-4000:] if output.is_file() else "(no output)"
    assert requeued(first), f"the job ended {first['JobState']} without being requeued:\n{tail}\n{ctld_log(job_id)}"
    # SLURM holds a requeued job for cred_expire (120 s by default) before it may start again, because slurmd
    # refuses a launch whose credential is not newer than the kill that revoked the run's last one ("Job N already
    # killed, do not launch batch job"), and both times count in whole seconds. The job is PENDING only after that
    # kill, so a release once the clock has left the second of this observation is always safe. (`StartTime=now`
    # at once raced the kill under load; a future StartTime waits for the next scheduler pass, ~30 s.)
    if first["JobState"] == "PENDING":
        wait_for_clock(math.floor(time.time()) + 1)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    return wait_for(job_id, lambda f: f["JobState"] in finished, "the end of the requeued run", deadline)


def wait_for_clock(when: float) -> None:
    """Bounded poll of the wall clock until it reads ``when`` (at most a second here)."""
    while time.time() < when:
        time.sleep(0.02)


def ctld_log(job_id: str) -> str:
    """slurmctld's and slurmd's log lines about the job, for a failure message."""
    logs = Path(os.environ.get("HPCKD_SLURM_STATE", "/nonexistent")) / "log"
    pattern = re.compile(rf"(JobId={job_id}|[Jj]ob {job_id})\b|\[{job_id}\.")
    lines = [line for name in ("slurmctld.log", "slurmd.log") if (logs / name).is_file()
             for line in (logs / name).read_text(errors="replace").splitlines() if pattern.search(line)]
    return "SLURM logs about the job:\n" + "\n".join(sorted(lines)[-40:])


@pytest.mark.slurm
def test_preempted_slurm_job_requeues_and_finishes_like_the_uninterrupted_run(synth_root, ds_run, tmp_path):
    require_cluster("tests/test_dist_training.py")
    out = tmp_path / "run"
    args = " ".join(job_args(synth_root, out, *ds_args()))
    script = tmp_path / "job.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --job-name=hpckd-preempt
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={tmp_path}/job.out
export OMP_NUM_THREADS=1 PYTHONPATH={REPO} PYTHONWARNINGS=ignore DS_ACCELERATOR=cpu
srun --kill-on-bad-exit=1 {sys.executable} {Path(__file__).resolve()} {args}
""")
    job_id = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True,
                            cwd=tmp_path).stdout.strip().split(";")[0]
    last = wait_for_requeue_and_end(job_id, tmp_path / "job.out")
    log = (tmp_path / "job.out").read_text()
    assert last["JobState"] == "COMPLETED", f"{log[-4000:]}\n{ctld_log(job_id)}"

    assert "hpckd: preempted by SIGUSR2: checkpoint written at epoch" in log and f"SLURM job {job_id} requeued" in log
    results = json.loads((out / "results.json").read_text())
    assert (results["launcher"], results["world_size"], results["backend"]) == ("srun", 2, "deepspeed")
    (resume,) = results["resumes"]
    assert resume["slurm_restart_count"] == "1" and 3 <= resume["step"] < EPOCHS * STEPS_PER_EPOCH
    events = read_log(out)
    preempted = [r for r in events if r["event"] == "preempted"]
    assert len(preempted) == 1 and preempted[0]["signal"] == "SIGUSR2" and preempted[0]["step"] == resume["step"]
    assert [r["event"] for r in events].count("start") == 2
    assert_same_training(ds_run, (out, results))


class PreemptingTrainJob(TrainJob):
    """A :class:`TrainJob` whose first run gets SIGUSR2 from SLURM while it trains (see :func:`_arrange_preemption`)."""

    def __call__(self):
        torch.set_num_threads(1)  # as in the test process (conftest): the same float reduction order
        _arrange_preemption()
        return super().__call__()


@pytest.mark.slurm
def test_submitit_train_job_is_checkpointed_requeued_and_resumed(synth_root, tmp_path):
    require_cluster("tests/test_dist_training.py")
    common = ["model.arch=resnet8", "aug=none", "data.loader=torch", "data.num_workers=0", "data.batch_size=16",
              "data.eval_batch_size=20", "optim.epochs=3", "optim.lr=0.02", "log_every=4", f"data.root={synth_root}"]
    out = tmp_path / "run"
    executor = make_executor("slurm", tmp_path / "submitit", timeout_min=15, cpus_per_task=1)
    job = executor.submit(PreemptingTrainJob("train", None, [*common, f"out_dir={out}"]))
    # The uninterrupted reference, in this process, while the job runs.
    ref = engine.run(load_experiment(None, [*common, f"out_dir={tmp_path / 'ref'}"]), mode="train")
    last = wait_for_requeue_and_end(job.job_id, job.paths.stderr)
    assert last["JobState"] == "COMPLETED", f"{job.paths.stderr.read_text()[-4000:]}\n{ctld_log(job.job_id)}"
    result = job.result()  # what TrainJob returned in the requeued run
    (resume,) = result["resumes"]
    assert resume["slurm_restart_count"] == "1" and 3 <= resume["step"] < result["steps"] == 36
    assert "submitit requeues the job" in job.paths.stderr.read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["launcher"] == "submitit" and results["metrics"] == result["metrics"]
    assert_same_training((tmp_path / "ref", ref), (out, results))


def _arrange_preemption() -> None:
    """Job entry: on the first run, rank 0 asks SLURM to send SIGUSR2 to every task of the job while micro-step 3
    computes (as a cluster does ahead of a time limit or a preemption). The requeued run trains undisturbed."""
    if os.environ.get("SLURM_RESTART_COUNT", "0") != "0" or os.environ.get("SLURM_PROCID") != "0":
        return
    from hpckd.train import engine

    def signal_at_third_micro_step(ctx: engine.StepContext) -> None:
        if ctx.micro == 3:
            subprocess.run(["scancel", "--signal=USR2", os.environ["SLURM_JOB_ID"]], check=True)

    engine.register_hook(signal_at_third_micro_step)


if __name__ == "__main__":
    _arrange_preemption()
    from hpckd.cli import main

    sys.exit(main(sys.argv[1:]))
