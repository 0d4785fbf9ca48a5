#!/usr/bin/env bash
# One task per GPU under SLURM; hpckd.dist.init() reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, takes MASTER_ADDR
# from the first host of the node list, and uses cuda:0 when SLURM binds one GPU per task. Usage, inside an sbatch
# script or salloc (or anywhere, with the task count in the environment):
#   launchers/srun.sh distill configs/quickstart.yaml
#   SLURM_NTASKS=2 launchers/srun.sh dist-check --cpu
# Preemption: submit with `--signal=USR2@120 --requeue`; the run checkpoints at the next step, requeues the job, and
# the requeued job resumes (resume=auto). PYTHON picks the interpreter (default: python on PATH).
set -euo pipefail
# --kill-on-bad-exit: one failed rank ends the step instead of leaving the others blocked in a collective.
exec srun --kill-on-bad-exit=1 "${PYTHON:-python}" -m hpckd "$@"
