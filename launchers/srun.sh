#!/usr/bin/env bash
# Inside an allocation: one task per GPU; hpckd.dist.init() reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and takes
# MASTER_ADDR from the first host of the node list. Usage (in an sbatch script or salloc):
#   launchers/srun.sh distill configs/quickstart.yaml
set -euo pipefail
exec srun --kill-on-bad-exit=1 python -m hpckd "$@"
